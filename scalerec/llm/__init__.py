"""Embedding fitting for frozen causal LMs: one-step proto-tokens ``[e, m]``, autoregressive ``[mem]`` vectors,
decoding, and resumable batch encoding jobs over Ray (``scalerec.llm.jobs``)."""
from .decoding import decode, decode_ar, decode_one_step
from .fitting import FitConfig, FitResult, fit_ar, fit_one_step
from .model import LoadedLM, load_causal_lm
from .shared import SharedMResult, fit_shared_m

__all__ = ["load_causal_lm", "LoadedLM", "FitConfig", "FitResult", "fit_one_step", "fit_ar", "fit_shared_m",
           "SharedMResult", "decode", "decode_one_step", "decode_ar"]
