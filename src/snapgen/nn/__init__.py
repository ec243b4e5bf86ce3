"""snapgen's leaf layer library: imports torch (and safetensors; huggingface_hub lazily), never the rest of
snapgen.

* :mod:`snapgen.nn.elastic` -- width-sliced layers (``ElasticLinear``, ``ElasticConv2d``, ``ElasticLayerNorm``),
  ``WidthSpec``, ``slice_chunks``, ``active_size``: the slicing rule of elastic width [SnapGen++ Sec. 3.2].
* :mod:`snapgen.nn.lora` -- named LoRA adapters on those layers: add, switch, merge exactly, save/load.
* :mod:`snapgen.nn.io` -- atomic safetensors writes, ``ModelIOMixin`` (``config.json`` + ``model.safetensors``).
* :mod:`snapgen.nn.hub` -- ``resolve_pretrained``: a folder, or a Hugging Face Hub id (cache first) -> a folder.
* :mod:`snapgen.nn.card` -- the ``README.md`` model card (YAML front matter) that ``save_pretrained`` writes.
"""
