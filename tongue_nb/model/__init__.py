"""Models: the backbone registry and multi-task model, pretrained weights, the colour statistics input, losses,
the classical baseline, the tongue segmenter and ONNX export."""
