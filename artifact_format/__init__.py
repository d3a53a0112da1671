"""The artifact contract shared by the compiler (which writes artifacts) and the runtime (which reads them).

  layout    format version, required files, limits' keys, alignment, target folders, JSON and sha256
  graph     the static op graph (frozen dataclasses) and its limits
  onnx_io   the graph to and from graph.onnx

The runtime imports this package and ``kernels`` (for the interpret and torch backends, which need the compile
extra) and nothing from ``compiler``.
"""
