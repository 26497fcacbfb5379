set -e
cp .gpu/p4/* /tmp/parts/
cat /tmp/parts/ortgpu.part.* > /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
rtx=""
if ls /tmp/parts/rtx.part.* >/dev/null 2>&1; then
  cat /tmp/parts/rtx.part.* > /tmp/tensorrt_rtx_cu13_libs-1.7.1.116-py3-none-manylinux_2_28_x86_64.whl
  rtx=/tmp/tensorrt_rtx_cu13_libs-1.7.1.116-py3-none-manylinux_2_28_x86_64.whl
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/onnxruntime_gpu-*.whl .gpu/whl/*.whl $rtx
extra=""
for pair in threadpoolctl:threadpoolctl rich:rich markdown_it:markdown_it_py mdurl:mdurl pygments:pygments onnx_ir:onnx_ir ml_dtypes:ml_dtypes pytest:pytest pluggy:pluggy iniconfig:iniconfig; do
  m=${pair%%:*}; w=${pair##*:}
  python3 -c "import $m" 2>/dev/null || extra="$extra $(ls .gpu/whl2/${w}-*.whl)"
done
echo "extra wheels:$extra"
[ -z "$extra" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $extra
mkdir -p /tmp/gm /tmp/peers /tmp/res
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import onnxruntime as o, amp_search, optuna, threadpoolctl, rich, onnx_ir; print(o.__version__, o.get_available_providers())"
[ -z "$rtx" ] || python3 -c "import tensorrt_rtx as t; print('tensorrt_rtx', t.__version__)"
