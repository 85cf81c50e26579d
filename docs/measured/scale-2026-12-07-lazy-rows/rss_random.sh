#!/bin/bash
# Candidate phase of the random baseline alone on bench_scale's 4M/16M workdirs: peak RSS
# before (HEAD worktree) and after (lazy rows).
# The workdirs: python experiments/bench_scale.py --root=/tmp/bench_scale27 --sizes=1e6,4e6,16e6 (commit 63728e0).
# Both commits choose the rows' rate with evaluate.lr_select="rows" (the default then).
set -e
run() { # code_root size out
  local code=$1 size=$2 out=$3
  local work=/tmp/bench_scale27/rows_$size
  (cd $code && PYTHONPATH=$code DIET_JAX_CACHE=/tmp/bench_scale27/jax_cache python experiments/bench_scale.py --child $out \
    --config=configs/taobao_synth.py --workdir=$work/run --config.data.synth_rows=$size \
    --config.data.data_dir=$work/raw "--config.evaluate.models=('dcn',)" \
    "--config.evaluate.methods=('random',)" --config.evaluate.max_epochs=2 --config.progress=False \
    --config.evaluate.rerun=True > $out.log 2>&1)
  python -c "import json;d=json.load(open('$out'));print('$out', {k:round(v/1024) for k,v in d['peak_rss_kb'].items()}, {k:round(v/1024) for k,v in d['peak_anon_kb'].items()}, {k:round(v,1) for k,v in d['seconds'].items()})"
}
run <worktree at 2d31994> 4000000 /tmp/rss_after_4M.json
run <worktree at 2d31994> 16000000 /tmp/rss_after_16M.json
run <worktree at 5bd8beb> 16000000 /tmp/rss_before_16M.json
run <worktree at 5bd8beb> 4000000 /tmp/rss_before_4M.json
