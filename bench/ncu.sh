#!/usr/bin/env bash
# Nsight Compute over the attention launch alone (GPU machine with ncu; see bench/profile_attention.py).
#   bash bench/ncu.sh OUTDIR NAME [profile_attention.py arguments...]
# Writes OUTDIR/NAME.ncu-rep, OUTDIR/NAME.txt (the sections: speed of light, occupancy, scheduler and
# warp-state statistics) and OUTDIR/NAME.sass.csv (stall samples per SASS instruction), and prints the
# text summary. Clocks are left alone (--clock-control none), as for every other timing of ours.
set -u
out=$1; name=$2; shift 2
mkdir -p "$out"
ncu=${NCU:-ncu}
command -v "$ncu" >/dev/null || ncu=$(ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
"$ncu" --clock-control none -k regex:_attn_kernel --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
  --section ComputeWorkloadAnalysis --section LaunchStats --section InstructionStats --section SourceCounters \
  -f -o "$out/$name" python3 bench/profile_attention.py --calls 2 "$@" > "$out/$name.log" 2>&1
tail -3 "$out/$name.log"
"$ncu" -i "$out/$name.ncu-rep" --page details > "$out/$name.txt" 2>&1
"$ncu" -i "$out/$name.ncu-rep" --page source --csv --print-source sass > "$out/$name.sass.csv" 2>&1
grep -v "^ *----" "$out/$name.txt" | grep -E "Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Block Limit|Issued Warp|No Eligible|Active Warps|Eligible Warps|Warp Cycles|Executed Ipc|Issue Slots|Pipe|Stall|stall" | head -60
wc -l "$out/$name.sass.csv"; head -c 600 "$out/$name.sass.csv"; echo
