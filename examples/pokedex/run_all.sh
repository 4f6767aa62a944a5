#!/bin/bash
# The pokedex comparison: each modality alone, all-native fusion and the hybrid, 3 seeds each,
# then one table (mean ± std over seeds) in runs/pokedex/comparison.md.
#
#   bash examples/pokedex/run_all.sh                      # from the repository root, 1 process
#   NPROC=4 bash examples/pokedex/run_all.sh              # under torchrun, 4 processes
#   SEEDS="0" EXTRA="training.epochs=5" bash examples/pokedex/run_all.sh   # a quick look
set -euo pipefail
SEEDS=${SEEDS:-"0 1 2"}
NPROC=${NPROC:-1}
EXTRA=${EXTRA:-}
RUNS=()
for cfg in numeric text text-minilm image fusion-native hybrid; do
  for seed in $SEEDS; do
    dir=runs/pokedex/$cfg-s$seed
    if [ "$NPROC" -gt 1 ]; then
      launch=(python -m torch.distributed.run --nproc-per-node "$NPROC" -m mmbridge.cli)
    else
      launch=(python -m mmbridge.cli)
    fi
    # shellcheck disable=SC2086
    "${launch[@]}" train "examples/pokedex/$cfg.yaml" "training.seed=$seed" "output.dir=$dir" \
        "output.name=$cfg" training.progress=false $EXTRA
    RUNS+=("$dir")
  done
done
python -m mmbridge.train.metrics runs/pokedex "${RUNS[@]}" --title "pokedex: single modality vs fusion vs hybrid"
