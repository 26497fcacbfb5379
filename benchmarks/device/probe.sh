mkdir -p /tmp/parts && cp .gpu/p0/* /tmp/parts/
nvidia-smi -L; python3 --version
for m in numpy onnx onnxruntime torch scipy rich onnx_ir ml_dtypes threadpoolctl pytest sqlalchemy; do python3 -c "import $m; print('$m', getattr($m,'__version__','?'))" 2>&1 | tail -1; done
