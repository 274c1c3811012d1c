from gemma_onnx.cli import main

main()
