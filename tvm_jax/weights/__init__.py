"""Weights from outside a training run: PyTorch files read without torch (:mod:`.torch_io`), the
official DiT's names mapped to ours (:mod:`.official`), ``hf://`` paths resolved through the Hugging
Face cache (:mod:`.hub`) and exported model directories (:mod:`.model_io`). The command that ties
them together is ``python -m tvm_jax.convert``."""
