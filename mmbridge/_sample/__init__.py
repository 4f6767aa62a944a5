"""The built-in synthetic sample dataset (``shapes/``) and the script that generates it.

Use :func:`mmbridge.data.sample_dir` to locate it.
"""
