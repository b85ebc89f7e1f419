"""ftjax: FasterTransformer-style inference for GPT- and T5-family transformers on JAX/XLA.

    import ftjax
    llm = ftjax.load(path, dtype="bfloat16", max_batch_size=8)
    res = llm.generate([[1, 2, 3]], max_new_tokens=16)
"""
from ftjax.llm import LLM, GenerationResult, load
from ftjax.sampling import SamplingParams

__all__ = ["load", "LLM", "GenerationResult", "SamplingParams"]
__version__ = "0.1.0"
