#!/usr/bin/env bash
# Every GPU figure of docs/performance.md in one call on a lent GPU machine, from the repo root:
#
#   bash bench/gpu_suite.sh                    # on the GPU machine (writes to $OUT)
#   QUICK=1 DEVICE=cpu bash bench/gpu_suite.sh # rehearsal on a CPU, tiny sizes
#   STEPS=bare-fp16,served-fp16 ONLY_BATCHES=8,16 ONLY_CONCURRENCY=16,32 bash bench/gpu_suite.sh
#
# Wheels (cp312) for the packages the machine lacks travel in .benchwhl/ (carried;
# keep it out of git), downloaded beside the development venv with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .benchwhl \
#     $(pip freeze | grep -iE '^(fastapi|starlette|pydantic|pydantic[-_]core|pydantic[-_]settings|python[-_]dotenv|uvicorn|httptools|orjson|pycocotools|sqlalchemy|python[-_]multipart|annotated[-_]types|typing[-_]inspection|opentelemetry[-_]api|typing[-_]extensions|anyio|annotated[-_]doc)==')
# Each step has its own time limit and a failed step does not stop the others;
# everything lands in $OUT: suite.log (all output), RESULTS.md (the updated
# tables, copied after every step), profile.txt, pytest.txt and servers.log (the
# servers' logs). The steps run most important first; in all about 8 minutes on an
# H200 before the static-shape / CUDA-graph steps, which add about 6 (STEPS=graphs
# runs only those: bare and served images/s, fp16 and fp32, the dynamic forward and
# the static one with graphs on and off, host syncs per batch, and the GPU tests).
set -u
OUT=${OUT:-/tmp/gpu-suite}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
STEPS=${STEPS:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/suite.log

if [ -d .benchwhl ] && ! python3 -c "import fastapi" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .benchwhl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

step() {  # step NAME SECONDS COMMAND...: run it with a limit, log it, time it
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  case ",$STEPS," in *",all,"* | *",$name,"*) ;; *) return 0 ;; esac
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start)) s" | tee -a "$LOG"
  cp "${BENCH_RESULTS:-bench/RESULTS.md}" "$OUT/RESULTS.md"  # whatever stops the rest
}

if [ "$QUICK" = 1 ]; then  # a CPU rehearsal: the same steps, small
  BATCHES=1,2; FEW=1,2; SECONDS_PER=1; CONC=1,4; HIGH=4,8; SAT=8
  SIZE=(--min-size 128 --max-size 160)
  BATCH=1; PROCS=1
else
  BATCHES=1,2,4,8,16,32; FEW=1,8,32; SECONDS_PER=2; CONC=1,8,16,32,64; HIGH=16,32,64; SAT=64
  SIZE=()
  BATCH=8; PROCS=4
fi
BATCHES=${ONLY_BATCHES:-$BATCHES}; CONC=${ONLY_CONCURRENCY:-$CONC}  # for a short re-measure
R50=(--model r50 --device "$DEVICE" "${SIZE[@]}")
SERVED=(--seconds "$((SECONDS_PER + 1))" --warmup 2 --processes "$PROCS")

gpu_step() {  # a step that needs CUDA (--graphs): skipped in a CPU rehearsal
  if [ "${DEVICE%%:*}" != cuda ]; then echo "=== $1: skipped (needs CUDA)" | tee -a "$LOG"; return 0; fi
  step "$@"
}
# STEPS=graphs: the static-shape and CUDA-graph steps below only
case ",$STEPS," in *",graphs,"*) STEPS="$STEPS,machine,bare-fp16,bare-fp16-graphs,\
bare-fp16-static,bare-fp32,bare-fp32-graphs,served-fp16,served-fp16-graphs,\
served-fp16-graphs-processes2,served-fp32,served-fp32-graphs,syncs-dynamic,\
syncs-static,syncs-graphs,pytest-static" ;; esac

step machine 30 bash -c 'nvidia-smi || true; command -v nvidia-cuda-mps-control || \
echo "no nvidia-cuda-mps-control"; python3 -c "import torch, torchvision; \
print(torch.__version__, torchvision.__version__, torch.cuda.is_available())"; \
python3 -c "import app.main, pycocotools, orjson, uvicorn; print(\"app imports ok\")"'
step bare-fp16 90 python3 bench/bare.py "${R50[@]}" --precision fp16 \
  --batch-sizes "$BATCHES" --seconds "$SECONDS_PER"
# the static forward captured in CUDA graphs, and the same forward uncaptured
gpu_step bare-fp16-graphs 100 python3 bench/bare.py "${R50[@]}" --precision fp16 \
  --batch-sizes "$BATCHES" --seconds "$SECONDS_PER" --graphs
step bare-fp16-static 90 python3 bench/bare.py "${R50[@]}" --precision fp16 \
  --batch-sizes "$BATCHES" --seconds "$SECONDS_PER" --static on
step served-fp16 110 python3 bench/served.py "${R50[@]}" --precision fp16 \
  --concurrency "$CONC" "${SERVED[@]}" --max-batch-size "$BATCH" \
  --server-log "$OUT/server-fp16.log"
gpu_step served-fp16-graphs 120 python3 bench/served.py "${R50[@]}" --precision fp16 \
  --concurrency "$CONC" "${SERVED[@]}" --max-batch-size "$BATCH" --graphs \
  --server-log "$OUT/server-fp16-graphs.log"
gpu_step served-fp16-graphs-processes2 120 python3 bench/served.py "${R50[@]}" --precision fp16 \
  --concurrency "$CONC" "${SERVED[@]}" --max-batch-size "$BATCH" --graphs --model-processes 2 \
  --server-log "$OUT/server-fp16-graphs-processes2.log"
case ",$STEPS," in *",all,"* | *",bare-fp32,"*)
  step bare-fp32 60 python3 bench/bare.py "${R50[@]}" --precision fp32 \
    --batch-sizes "$FEW" --seconds "$SECONDS_PER" ;;
esac
gpu_step bare-fp32-graphs 80 python3 bench/bare.py "${R50[@]}" --precision fp32 \
  --batch-sizes "$FEW" --seconds "$SECONDS_PER" --graphs
step served-fp32 90 python3 bench/served.py "${R50[@]}" --precision fp32 \
  --concurrency "$HIGH" "${SERVED[@]}" --max-batch-size "$BATCH" \
  --server-log "$OUT/server-fp32.log"
gpu_step served-fp32-graphs 100 python3 bench/served.py "${R50[@]}" --precision fp32 \
  --concurrency "$HIGH" "${SERVED[@]}" --max-batch-size "$BATCH" --graphs \
  --server-log "$OUT/server-fp32-graphs.log"
# host syncs per batch (bench/profile_batch.py): dynamic forward, static, static in graphs
syncs() {  # syncs STEP FLAGS...: the sync count and the forward's note, into syncs.txt
  local name=$1
  shift
  "$STEP_KIND" "$name" 90 bash -c "echo '=== $*' >> '$OUT/syncs.txt'; python3 \
    bench/profile_batch.py ${R50[*]} --precision fp16 --batch-size $BATCH --rows 5 $* \
    > '$OUT/syncs-last.txt' 2>&1; status=\$?; grep -E 'host syncs|Forward:' '$OUT/syncs-last.txt' \
    | tee -a '$OUT/syncs.txt'; rm -f '$OUT/syncs-last.txt'; exit \$status"
}
STEP_KIND=step syncs syncs-dynamic --static off
STEP_KIND=step syncs syncs-static --static on
STEP_KIND=gpu_step syncs syncs-graphs --graphs
step pytest-static 120 bash -c "python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
  tests/model/inference/test_static.py > '$OUT/pytest-static.txt' 2>&1; status=\$?; \
  tail -5 '$OUT/pytest-static.txt'; exit \$status"
step served-fp16-b32 70 python3 bench/served.py "${R50[@]}" --precision fp16 \
  --concurrency "$SAT" "${SERVED[@]}" --max-batch-size $((BATCH * 4)) \
  --server-log "$OUT/server-fp16-b32.log"
# N copies of the model in child processes (MODEL_PROCESSES; 2 is the GPU default)
served_processes() {  # served_processes STEP LIMIT PROCESSES BATCH CLIENTS
  step "$1" "$2" python3 bench/served.py "${R50[@]}" --precision fp16 --concurrency "$5" \
    "${SERVED[@]}" --max-batch-size "$4" --model-processes "$3" \
    --server-log "$OUT/server-${1#served-}.log"
}
served_processes served-fp16-processes2 120 2 "$BATCH" "$CONC"
served_processes served-fp16-processes3 100 3 "$BATCH" "$HIGH"
served_processes served-fp16-processes4 80 4 "$BATCH" "$SAT"
step pytest 120 bash -c "python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
  tests/model/inference/test_nms.py tests/model/inference/test_precision.py tests/model/inference/test_fusion.py \
  tests/model/inference/test_masks.py tests/model/inference/test_rle.py tests/model/inference/test_static.py \
  tests/app/inputs/test_device_decode.py \
  tests/app/serving/test_modelprocess.py > '$OUT/pytest.txt' 2>&1; status=\$?; \
  tail -5 '$OUT/pytest.txt'; exit \$status"
step plain-blocks 50 python3 bench/bare.py "${R50[@]}" --precision fp16 \
  --batch-sizes "$FEW" --seconds "$SECONDS_PER" --plain-blocks
step unfused 50 python3 bench/bare.py "${R50[@]}" --precision fp16 \
  --batch-sizes "$FEW" --seconds "$SECONDS_PER" --unfused
step profile 90 bash -c "python3 bench/profile_batch.py ${R50[*]} --precision fp16 \
  --batch-size $BATCH --stacks --rows 25 > '$OUT/profile.txt' 2>&1; status=\$?; tail -5 '$OUT/profile.txt'; exit \$status"
step bare-bf16 40 python3 bench/bare.py "${R50[@]}" --precision bf16 \
  --batch-sizes "$BATCH,$((BATCH * 4))" --seconds "$SECONDS_PER"
step overhead 40 python3 bench/overhead.py --no-decode
# not affected by model.inference.fusion; run with STEPS=...,loop-selection,bare-fp32,postprocess
for experiment in loop-selection graph-backbone; do
  case ",$STEPS," in *",$experiment,"*) ;; *) continue ;; esac
  step "$experiment" 60 python3 bench/bare.py "${R50[@]}" --precision fp16 \
    --batch-sizes "$FEW" --seconds "$SECONDS_PER" "--$experiment"
done
case ",$STEPS," in *",postprocess,"*)
  step postprocess 60 python3 bench/postprocess.py --device "$DEVICE" --repeats 10 ;;
esac
# larger batches with model processes gained less; run with STEPS=...,served-fp16-processes2-b16
for processes in 2 3; do
  case ",$STEPS," in *",served-fp16-processes$processes-b16,"*) ;; *) continue ;; esac
  served_processes "served-fp16-processes$processes-b16" 80 "$processes" $((BATCH * 2)) "$HIGH"
done
# NVIDIA MPS: the children's kernels share the GPU at once rather than in turns
# (time-slicing). Run with STEPS=...,served-fp16-processes4-mps (3 and 2 likewise).
for processes in 4 3 2; do
  name=served-fp16-processes$processes-mps
  case ",$STEPS," in *",$name,"*) ;; *) continue ;; esac
  if ! command -v nvidia-cuda-mps-control >/dev/null; then
    echo "=== $name: exit 127 (no nvidia-cuda-mps-control here)" | tee -a "$LOG"
    continue
  fi
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d >>"$LOG" 2>&1
  served_processes "$name" 80 "$processes" "$BATCH" "$SAT"
  echo quit | nvidia-cuda-mps-control >>"$LOG" 2>&1
  cat "$CUDA_MPS_LOG_DIRECTORY"/control.log >>"$LOG" 2>/dev/null
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
done
# one file for the servers' logs: $OUT brings back 8 files at most
for log in "$OUT"/server-*.log; do
  [ -f "$log" ] && { echo "=== $log"; cat "$log"; rm "$log"; }
done >>"$OUT/servers.log"
grep -E "^=== [a-z0-9-]+: exit" "$LOG"
