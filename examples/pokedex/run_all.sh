#!/bin/bash
# The pokedex comparison: each modality alone, all-native fusion, the TF-only Keras model, the
# torch-only model, and the hybrid (which bridges the Keras parts the TF-only run of the same seed
# trained), 3 seeds each, then one table (mean ± std over seeds) in runs/pokedex/comparison.md.
#
#   bash examples/pokedex/run_all.sh                      # from the repository root, 1 process
#   NPROC=4 bash examples/pokedex/run_all.sh              # under torchrun, 4 processes (tf-only: always 1)
#   SEEDS="0" EXTRA="training.epochs=5" bash examples/pokedex/run_all.sh   # a quick look
#
# tf-only runs before hybrid: hybrid reads runs/pokedex/tf-only-s$seed/{image_encoder,numeric_preprocess}.keras.
# tf-only (framework: keras) trains in fp32, on the CPU, without accumulation: training.precision,
# training.device and training.grad_accum in EXTRA are not passed to it.
set -euo pipefail
# the README's .venv when it exists and no other interpreter is given (PYTHON=...)
PY=${PYTHON:-$(if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python; fi)}
SEEDS=${SEEDS:-"0 1 2"}
NPROC=${NPROC:-1}
EXTRA=${EXTRA:-}
RUNS=()
for cfg in numeric text text-minilm image fusion-native tf-only torch-only hybrid; do
  for seed in $SEEDS; do
    dir=runs/pokedex/$cfg-s$seed
    extra=$EXTRA
    per_cfg=()
    if [ "$NPROC" -gt 1 ] && [ "$cfg" != tf-only ]; then
      launch=("$PY" -m torch.distributed.run --nproc-per-node "$NPROC" -m mmbridge.cli)
    else
      launch=("$PY" -m mmbridge.cli)
    fi
    if [ "$cfg" = tf-only ]; then
      # shellcheck disable=SC2001
      extra=$(echo "$EXTRA" | sed -E 's/training\.(precision|device|grad_accum)=[^ ]*//g')
    fi
    if [ "$cfg" = hybrid ]; then
      per_cfg=("model.branches.image.encoder.ref=runs/pokedex/tf-only-s$seed/image_encoder.keras"
               "model.branches.numeric.preprocess.ref=runs/pokedex/tf-only-s$seed/numeric_preprocess.keras")
    fi
    # shellcheck disable=SC2086
    "${launch[@]}" train "examples/pokedex/$cfg.yaml" "training.seed=$seed" "output.dir=$dir" \
        "output.name=$cfg" training.progress=false ${per_cfg[@]+"${per_cfg[@]}"} $extra
    RUNS+=("$dir")
  done
done
"$PY" -m mmbridge.train.metrics runs/pokedex "${RUNS[@]}" --title "pokedex: single modality vs fusion vs TF-only vs torch-only vs hybrid"
