#!/usr/bin/env bash
# Every throughput comparison of the accelerator issue in one GPU session, each
# pair side by side: our GPT-2 124M and BERT-base train steps with each speed
# switch, nanoGPT's bench.py (torch.compile) and HF BertForPreTraining beside them.
#   OUT=gpu_results bash experiments/gpu_benchmarks.sh            (~10 min)
#   OUT=gpu_results ONLY=gpt bash experiments/gpu_benchmarks.sh   (then ONLY=bert)
# GPT_ROWS / BERT_ROWS (space-separated --compare values), GPT_BREAKDOWN= /
# BERT_BREAKDOWN= (empty: skip the forward/backward split), GPT_PROFILE= /
# BERT_PROFILE= (empty: skip the kernel-time profile of the baseline) and *_S
# (time limits in seconds) shorten a session. GPT_SHAPE / BERT_SHAPE replace the
# preset and shape, e.g. GPT_SHAPE="--preset gpt-tiny --batch 2 --seq 16" for a
# smoke test on CPU. nanoGPT is not part of this repository: put its bench.py,
# model.py and configurator.py in third_party/nanoGPT/ (ignored by git).
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=.
PY=${PYTHON:-python3}
# Every speed switch off in turn (plain: all of them), plus XLA's Triton GEMMs off.
GPT_ROWS=${GPT_ROWS-"plain attention=xla fused_qkv=false loss_chunk=4096 scan_layers=true vocab_pad_multiple=1 xla_gpu_enable_triton_gemm=false"}
BERT_ROWS=${BERT_ROWS-"plain attention=xla xla_gpu_enable_triton_gemm=false"}
ONLY=${ONLY:-all}   # gpt | bert | all: the halves take ~5 min each, one device call each
compare() { for r in $1; do printf -- "--compare %s " "$r"; done; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
if [ "$ONLY" != bert ]; then
# shellcheck disable=SC2046
timeout "${GPT_S:-400}" $PY -m experiments.bench_throughput ${GPT_SHAPE:---preset gpt2-small --batch 12 --seq 1024} \
    --set vocab_pad_multiple=128 ${GPT_BREAKDOWN---breakdown} ${GPT_PROFILE---profile=/tmp/profile_gpt2} \
    $(compare "$GPT_ROWS") 2>&1 | tee "$OUT/gpt2.md"
if [ -f third_party/nanoGPT/bench.py ]; then
  (cd third_party/nanoGPT && timeout "${NANO_S:-120}" $PY bench.py --real_data=False) 2>&1 \
      | grep -v "^[0-9]*/[0-9]* loss" | tee "$OUT/nanogpt.txt"
fi
fi
if [ "$ONLY" != gpt ]; then
# shellcheck disable=SC2046
timeout "${BERT_S:-300}" $PY -m experiments.bench_throughput ${BERT_SHAPE:---preset bert-base --batch 32 --seq 512} \
    --set vocab_pad_multiple=128 ${BERT_BREAKDOWN---breakdown} ${BERT_PROFILE---profile=/tmp/profile_bert} \
    $(compare "$BERT_ROWS") 2>&1 | tee "$OUT/bert.md"
timeout "${HF_S:-90}" $PY -m experiments.bench_hf_bert --batch 32 --seq 512 2>&1 | tail -3 | tee "$OUT/hf_bert.txt"
fi
