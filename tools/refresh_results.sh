#!/usr/bin/env bash
# Every result folder in docs/ written again from the weights in assets/, each by the
# command docs/README.md lists for it (run after the shipped weights change):
#   the showcase (held-out seeds, and fresh ones), the README policy grid,
#   memory-unnamed, heads, prompt switching, speed, the training curve and the
#   browser screenshots.
# Usage: bash tools/refresh_results.sh [part ...]   (parts: showcase fresh eval unnamed
#        heads switch bench curve screenshots; default all). EVAL_ARGS adds to both evals
#        (e.g. "--backend ray --ray-cpus 2").
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-python}
EVAL_ARGS=${EVAL_ARGS:-}
parts=${*:-showcase fresh eval unnamed heads switch bench curve screenshots}
log() { echo "== $(date +%T) $*"; }

for part in $parts; do
    log "$part"
    case $part in
        showcase) $PY -m ffviz showcase --seeds 200-207 --frames 160 --also teacher-forced:4 \
                      --out docs/showcase ;;
        fresh) $PY -m ffviz showcase --seeds 300-307 --frames 160 --also teacher-forced:4 \
                   --out docs/showcase_fresh ;;
        eval) $PY -m ffviz eval --policies full,window,sink,expected_attention,future_forcing,forcing_kv,oracle \
                  --variant ff_no_merge=future_forcing --policy-arg ff_no_merge:tau=0 \
                  --variant ff_adaptive=future_forcing --policy-arg ff_adaptive:head_budget=adaptive \
                  --variant ea_adaptive=expected_attention --policy-arg ea_adaptive:head_budget=adaptive \
                  --budgets 3 --seeds 1000-1015 --out docs/eval $EVAL_ARGS ;;
        unnamed) $PY -m ffviz eval --suite memory-unnamed --policies full,window,sink,future_forcing \
                     --budgets 3 --out docs/eval_unnamed $EVAL_ARGS ;;
        heads) $PY -m ffviz heads --out docs/heads ;;
        switch) $PY tools/prompt_switching.py --seeds 0-7 --out docs/switch/table.json ;;
        bench) $PY -m ffviz bench --out docs/speed/bench.json
               $PY -m ffviz bench --policies full,window,future_forcing --out docs/speed/bench_policies.json
               $PY -m ffviz bench --recache --out docs/speed/bench_recache.json ;;
        curve) $PY tools/training_curve.py assets/tiny.json docs/training_curve.png ;;
        screenshots) FFVIZ_SCREENSHOT_DIR=docs $PY -m pytest -q tests/test_browser.py ;;
        *) echo "unknown part: $part (showcase fresh eval unnamed heads switch bench curve screenshots)" >&2
           exit 2 ;;
    esac
done
log "done: compare with git diff --stat docs/ and update the numbers README and docs quote"
