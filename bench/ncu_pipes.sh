#!/usr/bin/env bash
# Pipe utilization and issue rate of the attention launch (GPU machine with Nsight Compute): which unit, if
# any, bounds it (NOTES #48). `--set full`, then the raw metrics grepped.
#   bash bench/ncu_pipes.sh OUTDIR NAME [profile_attention.py arguments...]
#   e.g. bash bench/ncu_pipes.sh $OUT/ncu flux_full --shape flux --topk 1.0
set -u
out=$1; name=$2; shift 2
mkdir -p "$out"
ncu=${NCU:-ncu}
command -v "$ncu" >/dev/null || ncu=$(ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
"$ncu" --clock-control none -k regex:_attn_kernel --launch-skip 1 --launch-count 1 --set full -f -o "$out/$name" \
  python3 bench/profile_attention.py --calls 2 "$@" > "$out/$name.log" 2>&1
tail -2 "$out/$name.log"
"$ncu" -i "$out/$name.ncu-rep" --page raw --print-metric-instances values > "$out/$name.raw.txt" 2>&1
grep -E "gpu__time_duration.sum|sm__cycles_elapsed.avg.per_second|launch__registers_per_thread |sm__warps_active.avg.per_cycle_active|smsp__issue_active.avg.pct|sm__inst_executed_pipe_[a-z_]*\.avg\.pct_of_peak_sustained_active|sm__pipe_[a-z_]*_cycles_active\.avg\.pct_of_peak_sustained_active" \
  "$out/$name.raw.txt" | awk '$NF != "0" {print $1, $(NF)}'
