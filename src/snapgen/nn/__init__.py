"""snapgen's leaf layer library: imports torch (and safetensors), never the rest of snapgen.

* :mod:`snapgen.nn.elastic` -- width-sliced layers (``ElasticLinear``, ``ElasticConv2d``, ``ElasticLayerNorm``),
  ``WidthSpec``, ``slice_chunks``, ``active_size``: the slicing rule of elastic width [SnapGen++ Sec. 3.2].
* :mod:`snapgen.nn.lora` -- named LoRA adapters on those layers: add, switch, merge exactly, save/load.
* :mod:`snapgen.nn.io` -- atomic safetensors writes, ``ModelIOMixin`` (``config.json`` + ``model.safetensors``).
"""
