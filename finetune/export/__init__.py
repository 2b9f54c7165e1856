"""Export a run or a merged model for local and CPU inference (GGUF, CTranslate2, ONNX), gated against transformers."""
