#!/usr/bin/env bash
# Every GPU number in benchmarks/README.md in one go, logs and JSON under OUTDIR:
#   ktest     the fused kernels' gpu tests (tests/kernels)
#   profile   benchmarks/gpu_profile.py, fused kernels off (MINIPEFT_KERNELS=0) and on
#   train     benchmarks/train_step.py --device cuda, GPT-2 small shape, full / lora / qlora
#   generate  benchmarks/generate.py --device cuda
#   gputest   the whole gpu test suite (python -m pytest -m gpu)
#   fast16    issue [fast16]'s table: train_step.py in bfloat16 and float16, full / lora / qlora, at 8 x 512
#             and 32 x 512 tokens (12 runs), then generate.py (the loop and the CUDA graph)
#   graph16   the same 12 training runs with minipeft's step recorded as a CUDA graph (--graph)
# usage: bash benchmarks/run_gpu.sh OUTDIR [stage ...]   (default: all stages, in that order)
set -u
out=${1:?usage: bash benchmarks/run_gpu.sh OUTDIR [stage ...]}
shift
stages=${*:-ktest profile train generate gputest}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1
for s in $stages; do
  echo "=== $s $(date -u +%FT%TZ)"
  case $s in
    ktest) timeout 300 python3 -m pytest -q -m gpu tests/kernels --tb=short > "$out/pytest_kernels.log" 2>&1
      tail -5 "$out/pytest_kernels.log" ;;
    profile)
      MINIPEFT_KERNELS=0 timeout 300 python3 benchmarks/gpu_profile.py --json "$out/prof_off.json" 2>&1 | grep -v USDT
      timeout 300 python3 benchmarks/gpu_profile.py --json "$out/prof_on.json" 2>&1 | grep -v USDT ;;
    train)
      for m in full lora qlora; do
        timeout 300 python3 benchmarks/train_step.py --device cuda --config gpt2 --batch 8 --seq 512 --mode $m \
          --steps 20 --warmup 3 --json "$out/train_$m.json" 2>&1 | grep -v -i warn | tail -16
      done ;;
    generate) timeout 300 python3 benchmarks/generate.py --device cuda --json "$out/generate.json" 2>&1 | tail -4 ;;
    fast16)
      for d in bfloat16 float16; do for b in 8 32; do for m in full lora qlora; do
        timeout 120 python3 benchmarks/train_step.py --device cuda --config gpt2 --batch $b --seq 512 --mode $m \
          --compute-dtype $d --json "$out/train_${d}_${m}_${b}x512.json" 2>&1 | grep -E "ratio|agree" | sed "s/^/$d $m $b: /"
      done; done; done
      timeout 300 python3 benchmarks/generate.py --device cuda --json "$out/generate.json" 2>&1 | tail -4 ;;
    graph16)
      for d in bfloat16 float16; do for b in 8 32; do for m in full lora qlora; do
        timeout 120 python3 benchmarks/train_step.py --device cuda --config gpt2 --batch $b --seq 512 --mode $m \
          --compute-dtype $d --graph --json "$out/graph_${d}_${m}_${b}x512.json" 2>&1 | grep -E "ratio|agree" | sed "s/^/$d $m $b: /"
      done; done; done ;;
    gputest) timeout 400 python3 -m pytest -q -m gpu --tb=short > "$out/pytest_gpu.log" 2>&1
      grep -E "^(FAILED|ERROR)|passed|failed" "$out/pytest_gpu.log" | tail -30 ;;
  esac
done
echo "=== done $(date -u +%FT%TZ)"
