"""Start one vLLM engine (in this process, no engine subprocess) and print greedy tokens as JSON.

Run by the tests in a subprocess each, so that every engine starts in a fresh process:
``python engine_run.py MODEL LOAD_FORMAT [EXTRA_JSON]``. Prints one JSON line
``{"tokens": [[...] per prompt], "logprobs": [[...] per prompt]}`` on stdout (with
``--load-format sllm`` also ``layout`` and ``trim``: the loader's ``last_layout`` and ``last_trim``); a failing engine
start leaves vLLM's own traceback on stderr and a non-zero exit status.
"""

from __future__ import annotations

import json
import os
import sys

# The settings vLLM's CPU build needs on this machine kind (see tests/vllm/conftest.py).
ENV = dict(
    VLLM_CPU_KVCACHE_SPACE="1", VLLM_HOST_IP="127.0.0.1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
    DO_NOT_TRACK="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
)
PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4"]


def main() -> int:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    model, load_format = sys.argv[1], sys.argv[2]
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    from vllm import LLM, SamplingParams

    kwargs = {} if extra is None else {"model_loader_extra_config": extra}
    llm = LLM(model=model, load_format=load_format, dtype="float32", max_model_len=128, enforce_eager=True, seed=0,
              **kwargs)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, logprobs=1), use_tqdm=False)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "logprobs": [[max(d.values(), key=lambda lp: lp.logprob).logprob for d in o.outputs[0].logprobs] for o in outs],
    }
    if load_format == "sllm":
        from sllm.integrations.vllm.loader import SllmModelLoader

        result["layout"] = SllmModelLoader.last_layout
        result["trim"] = SllmModelLoader.last_trim
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
