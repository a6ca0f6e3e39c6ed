#!/usr/bin/env bash
# The course's experiments on one GPU (issue [reproduce]), independent runs in parallel.
#   bases    pretrain the GPU bases small (T1), medium (T2), large (T3), 512 positions each, in parallel;
#            the gpu test suite runs beside them
#   e2e      the E2E lesson on the medium base and the real dev set, 14 runs at a time (~7 min on an H200);
#            finished runs are kept in .gpu_cache/e2e_runs, so rerunning the stage resumes
#   lessons  qlora, side_tuning and peft_methods on the GPU, in parallel
#   all      everything at once, each run started as soon as its base exists: the three bases and the gpu
#            tests; on 'small' qlora, side_tuning and peft_methods part 1; on 'medium' the E2E lesson (12
#            processes) and peft_methods part 3 (prompt tuning on tiny, small, medium). peft_methods part 2
#            (adapters vs data, LR sensitivity; hundreds of runs) is left to the CPU record. Writes OUTDIR/DONE.
# usage: bash benchmarks/reproduce_gpu.sh OUTDIR [stage ...]   (default: bases e2e lessons)
# The bases are cached in $MINIPEFT_CACHE (default .gpu_cache/ in the checkout, git-ignored), so the
# lessons stage reuses them; the E2E CSV is read from $E2E_CSV (default .data/devset.csv).
set -u
out=${1:?usage: bash benchmarks/reproduce_gpu.sh OUTDIR [stage ...]}
shift
stages=${*:-bases e2e lessons}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MINIPEFT_CACHE=${MINIPEFT_CACHE:-$PWD/.gpu_cache}
csv=${E2E_CSV:-.data/devset.csv}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"
for s in $stages; do
  echo "=== $s $(date -u +%FT%TZ)"
  case $s in
    bases)
      for size in small medium large; do
        python3 -m minipeft.pretrain --size $size --device cuda > "$out/pretrain_$size.log" 2>&1 &
      done
      timeout 420 python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider > "$out/pytest_gpu.log" 2>&1 &
      wait
      for size in small medium large; do echo "-- $size"; grep -E "validation loss|unigram|saved|Error" "$out/pretrain_$size.log"; done
      grep -E "^(FAILED|ERROR)|passed|failed" "$out/pytest_gpu.log" | tail -15 ;;
    e2e)
      python3 -m minipeft.lessons.e2e --device cuda --size medium --data "$csv" --jobs 14 \
        --cache "$MINIPEFT_CACHE/e2e_runs" --json "$out/e2e.json" --figures "$out/fig" > "$out/e2e.log" 2>&1
      grep -E "^\[e2e\]" "$out/e2e.log" | sort; tail -40 "$out/e2e.log" ;;
    lessons)
      python3 -m minipeft.lessons.peft_methods --device cuda --json "$out/peft_methods.json" \
        --figures "$out/fig" > "$out/peft_methods.log" 2>&1 &
      python3 -m minipeft.lessons.side_tuning --device cuda --json "$out/side_tuning.json" \
        --figures "$out/fig" > "$out/side_tuning.log" 2>&1 &
      python3 -m minipeft.lessons.qlora --device cuda --json "$out/qlora.json" \
        --figures "$out/fig" > "$out/qlora.log" 2>&1 &
      wait
      for l in peft_methods side_tuning qlora; do echo "-- $l"; tail -25 "$out/$l.log"; done ;;
    all)
      pt() { python3 -m minipeft.pretrain --size "$1" --device cuda > "$out/pretrain_$1.log" 2>&1; }
      lesson() { local name=$1 file=$2; shift 2
        python3 -m minipeft.lessons.$name --device cuda --json "$out/$file.json" --figures "$out/fig" "$@" \
          > "$out/$file.log" 2>&1; echo "-- $file rc $? $(date -u +%T)"; }
      timeout 420 python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider > "$out/pytest_gpu.log" 2>&1 &
      pt large &
      (pt small; touch "$out/pretrain_small.done"; echo "-- small done $(date -u +%T)"
       lesson qlora qlora & lesson side_tuning side_tuning & lesson peft_methods peft_methods_part1 --parts 1 & wait) &
      (pt medium; echo "-- medium done $(date -u +%T)"
       lesson e2e e2e --size medium --data "$csv" --jobs 12 --cache "$MINIPEFT_CACHE/e2e_runs" &
       (until [ -f "$out/pretrain_small.done" ]; do sleep 5; done
        lesson peft_methods peft_methods_part3 --parts 3) & wait) &
      wait
      for size in small medium large; do echo "-- $size"; grep -E "validation loss|unigram|saved|Error" "$out/pretrain_$size.log"; done
      grep -E "^(FAILED|ERROR)|passed|failed" "$out/pytest_gpu.log" | tail -15
      touch "$out/DONE" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
echo "=== done $(date -u +%FT%TZ)"
