tar xzf bundle.tar.gz && source bundle/env.sh
bash tests/gpu/device_run.sh all '*' | tail -40
mlaserve bench-kernels > $OUT/bench_kernels.log 2>&1; tail -45 $OUT/bench_kernels.log
