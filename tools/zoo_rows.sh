#!/bin/bash
# Measure keras.applications zoo rows one model per process (a crash or an out-of-memory kill costs one
# row; TF's graph state does not pile up), appending each row to ROWS for
#   PYTHONPATH=. python tools/gen_zoo_table.py --rows ROWS --section keras.applications
#
# usage (repository root): tools/zoo_rows.sh ROWS LIMIT_S MODEL...
#   ROWS     the rows file (JSON lines; MMBRIDGE_ZOO_ROWS)
#   LIMIT_S  seconds one model's test may run; past it the row says "not measured" and why
#   MODEL    keras.applications constructor names (tests/export/test_families.py APPLICATIONS)
# env: PYTHON (default python), MMBRIDGE_COMPILE_BACKEND, MMBRIDGE_ZOO_COMPILE=0 (skip the compile column),
#      ZOO_DEADLINE (epoch seconds: a model is not started with under 150 s left; its row says so),
#      ZOO_THREADS (default 1): TensorFlow's and torch's CPU threads in each row's process. One thread each keeps
#      the train-step column fair and meaningful on a shared machine: with 2 threads at load 4 on 2 cores, torch's
#      OpenMP parallel regions stalled (EfficientNetV2B3's row measured 5.1 s per torch step vs 0.16 s for Keras;
#      ZOO_THREADS=0 tools/zoo_rows.sh ROWS 600 EfficientNetV2B3 beside other jobs shows it); ZOO_THREADS=0 leaves
#      both libraries' defaults
set -u
threads=${ZOO_THREADS:-1}
if [ "$threads" != 0 ]; then
  export TF_NUM_INTRAOP_THREADS=$threads TF_NUM_INTEROP_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
fi
rows=$1; lim=$2; shift 2
py=${PYTHON:-python}
mkdir -p "${ZOO_LOGS:-/tmp/zoo_logs}"
for m in "$@"; do
  limit=$lim
  if [ -n "${ZOO_DEADLINE:-}" ]; then
    left=$(( ZOO_DEADLINE - $(date +%s) ))
    if [ $left -lt 150 ]; then
      echo "{\"family\": \"keras.applications\", \"model\": \"$m\", \"export\": false, \"not_run\": \"not attempted in this run: the run's time budget ran out (rows run one at a time on a shared 2-core CPU)\"}" >> "$rows"
      echo "$m: not attempted"; continue
    fi
    [ $left -lt $limit ] && limit=$left
  fi
  load=$(cut -d' ' -f1 /proc/loadavg); t0=$(date +%s)
  MMBRIDGE_ZOO=1 MMBRIDGE_ZOO_ROWS="$rows" PYTHONPATH=. timeout "$limit" "$py" -m pytest -q -p no:cacheprovider \
    "tests/export/test_families.py::test_family_exports_with_parity[keras.applications-$m]" > "${ZOO_LOGS:-/tmp/zoo_logs}/$m.log" 2>&1
  rc=$?
  echo "$m: rc=$rc $(( $(date +%s) - t0 )) s (load $load at start)"
  if [ $rc = 137 ]; then
    echo "{\"family\": \"keras.applications\", \"model\": \"$m\", \"export\": false, \"not_run\": \"not measured here: its process was killed (SIGKILL; on this machine the kernel's out-of-memory killer, $(free -g | awk '/Mem:/{print $2}') GiB of RAM; see dmesg)\"}" >> "$rows"
  fi
  if [ $rc = 124 ]; then
    echo "{\"family\": \"keras.applications\", \"model\": \"$m\", \"export\": false, \"not_run\": \"not measured here: its test ran past the ${limit} s limit on the shared 2-core CPU (1-minute load $load at its start)\"}" >> "$rows"
  fi
done
