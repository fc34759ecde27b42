"""Language-model distillation: token-level divergences for causal LMs (``distill.lm.losses``).

Conventions (causal shift, ``-100`` masks, generalized-JSD β, reduction over the optimizer step,
sparse top-k teacher tail) are fixed in ``docs/conventions.md``, section "Language-model token losses".
"""
