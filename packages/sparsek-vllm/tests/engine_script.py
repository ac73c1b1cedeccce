"""Run a real vLLM engine on a tiny local model and dump greedy outputs (used by test_vllm_engine_cpu.py).

Usage: python engine_script.py MODEL_DIR OUT_JSON DTYPE. Writes ``{"tokens": [wave][prompt][step], "top2":
[wave][prompt][step] -> [[token, logprob], [token, logprob]]}``. The backend is whatever vLLM picks; the test sets
``SPARSEK_VLLM_REPLACE=CPU_ATTN`` for the sparsek run, so the plugin swaps sparsek in for vLLM's CPU backend in every
engine process. The body is guarded by ``__main__`` because the engine spawns processes.
"""

from __future__ import annotations

import json
import sys


def make_prompts() -> tuple[list[list[int]], list[list[int]]]:
    """Two waves of token-id prompts: different lengths (some span several 32-token KV blocks), then prompts that
    share long prefixes with the first wave (prefix-cache hits: prefill with a cached prefix)."""
    import random

    rng = random.Random(1234)
    first = [[rng.randrange(1, 500) for _ in range(n)] for n in (3, 29, 33, 70, 131)]
    second = [
        first[3][:64] + [rng.randrange(1, 500) for _ in range(9)],  # 2 cached blocks + 9 new tokens
        first[4][:96] + [rng.randrange(1, 500) for _ in range(40)],  # 3 cached blocks + a chunked tail
        list(first[2]),  # identical prompt: all full blocks cached
        [rng.randrange(1, 500) for _ in range(5)],
    ]
    return first, second


def main() -> None:
    model_dir, out_path, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        skip_tokenizer_init=True,
        dtype=dtype,
        enforce_eager=True,
        enable_prefix_caching=True,
        block_size=32,
        max_model_len=256,
        max_num_seqs=8,
        max_num_batched_tokens=96,  # long prompts are chunked, so prefill chunks run beside decodes
        seed=0,
    )
    # logprobs=2: each step's two best tokens and their log-probabilities (how close a greedy choice was)
    params = SamplingParams(temperature=0.0, max_tokens=12, detokenize=False, ignore_eos=True, logprobs=2)
    results, top2 = [], []
    for wave in make_prompts():
        outs = llm.generate([{"prompt_token_ids": p} for p in wave], params, use_tqdm=False)
        results.append([list(o.outputs[0].token_ids) for o in outs])
        top2.append([[_best_two(step) for step in o.outputs[0].logprobs] for o in outs])
    with open(out_path, "w") as f:
        json.dump({"tokens": results, "top2": top2}, f)


def _best_two(step: dict) -> list[list]:
    """The two most likely tokens of one decoding step as ``[[token, logprob], [token, logprob]]``."""
    best = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:2]
    return [[tok, lp.logprob] for tok, lp in best]


if __name__ == "__main__":
    main()
