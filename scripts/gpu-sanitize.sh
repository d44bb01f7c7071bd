#!/usr/bin/env bash
# Runs ON the GPU machine (scripts/gpu-sweep.sh's opt-in `sanitize` step): every library under
# gpu-carry/libs (or GPU_SANITIZE_ROOT's; but the random_* ones unless GPU_SANITIZE_LIBS names them) through
# `ccc-run validate` under compute-sanitizer's memcheck (out-of-bounds and misaligned accesses,
# device faults), racecheck (shared-memory hazards), synccheck (barriers that not every thread
# reaches, bad mbarrier use) and initcheck (reads of global memory never written), at
# B 2 x S 300 and B 1 x S 1000: small shapes, because racecheck instruments every shared-memory
# access, and S not a multiple of any tile, so that edge tiles run too.
#
# Writes $OUT/sanitize.md (library, shape, tool, errors, where, validate's verdict, seconds) and
# every invocation's full output, one after the other, to $OUT/sanitize.log. Exit status: 0 when
# every tool reports 0 errors and every validate passes, 1 otherwise (also for a run that timed
# out or printed no ERROR SUMMARY), 2 when the artifacts or compute-sanitizer are missing.
#
# Environment:
#   GPU_SANITIZE_ROOT     the libraries' directory (default gpu-carry/libs; gpu-carry/train for the
#                         training libraries, whose validate runs the backward too)
#   GPU_SANITIZE_LIBS     only libraries whose path contains this text (default: all but random_*)
#   GPU_SANITIZE_TOOLS    default "memcheck racecheck synccheck initcheck"
#   GPU_SANITIZE_SHAPES   default "2x300 1x1000" (BxS)
#   GPU_SANITIZE_TIMEOUT  seconds per invocation (default 150): a hang costs one row
#   GPU_SANITIZE_JOBS     invocations at once (default 4; each is one process on the one GPU,
#                         mostly busy on the CPU with the f64 reference and the instrumentation)
#   COMPUTE_SANITIZER     default /usr/local/cuda/bin/compute-sanitizer
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-sweep-out}
carry=gpu-carry
run="$PWD/$carry/ccc-run"
sanitizer=${COMPUTE_SANITIZER:-/usr/local/cuda/bin/compute-sanitizer}
tools=${GPU_SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}
shapes=${GPU_SANITIZE_SHAPES:-2x300 1x1000}
limit=${GPU_SANITIZE_TIMEOUT:-150}
jobs=${GPU_SANITIZE_JOBS:-4}
filter=${GPU_SANITIZE_LIBS:-}
root=${GPU_SANITIZE_ROOT:-$carry/libs}

[ -x "$run" ] || { echo "gpu-sanitize: $run not found (scripts/gpu-prepare.sh)" >&2; exit 2; }
[ -x "$sanitizer" ] || { echo "gpu-sanitize: $sanitizer not found" >&2; exit 2; }
# One log per invocation while they run side by side, joined into one file at the end (one file
# comes back from a remote run where 88 would not).
logs=$(mktemp -d)
mkdir -p "$out"
"$sanitizer" --version | tail -1

mapfile -t libraries < <(find "$root" -name manifest.json 2>/dev/null | sed 's|/manifest.json$||' | sort)
selected=()
for lib in "${libraries[@]}"; do
  name=${lib#"$root/"}
  if [ -n "$filter" ]; then
    [[ "$name" == *"$filter"* ]] || continue
  elif [[ "$name" == random_* ]]; then
    continue
  fi
  selected+=("$lib")
done
[ ${#selected[@]} -gt 0 ] || { echo "gpu-sanitize: no library selected under $root" >&2; exit 2; }

# Tool-specific options. racecheck keeps its default report mode, `analysis`: one report per
# pair of racing instructions ("Race reported between Write access at K+0x.. and Write access at
# K+0x.. [N hazards]") where `hazard` prints every hazard and the first few hundred thousand
# of one benign pair would hide any other; it ends with "RACECHECK SUMMARY: R hazards displayed
# (E errors, W warnings)" instead of an ERROR SUMMARY line. memcheck keeps leak checking off
# (not what this step is for). Every tool keeps --check-warpgroup-mma yes (wgmma operand checks
# on sm_90a).
tool_options() {
  case $1 in
    racecheck) echo "--racecheck-report analysis" ;;
    *) echo "" ;;
  esac
}

# One invocation: sanitizer + validate of one library at one shape, its own log, its own limit.
sanitize_one() {
  local lib=$1 shape=$2 tool=$3 log=$4
  local batch=${shape%x*} seq_len=${shape#*x} started=$SECONDS
  # shellcheck disable=SC2046
  # --show-backtrace device: the host frames of the stripped ccc-run say nothing.
  timeout --kill-after=10 "$limit" "$sanitizer" --tool "$tool" $(tool_options "$tool") \
    --show-backtrace device --print-limit 100 \
    "$run" validate "$lib" --batch "$batch" --seq-len "$seq_len" --seed 0 >"$log" 2>&1
  echo "exit $? seconds $((SECONDS - started))" >>"$log"
}

cases=()
for lib in "${selected[@]}"; do
  name=${lib#"$root/"}
  for shape in $shapes; do
    for tool in $tools; do
      log="$logs/${name//\//_}.$shape.$tool.log"
      cases+=("$name|$shape|$tool|$log")
      sanitize_one "$lib" "$shape" "$tool" "$log" &
      while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
    done
  done
done
wait

header=$'| library | BxS | tool | errors | where (first reports) | validate | seconds |\n|---|---|---|---|---|---|---|'
rows=()
failures=0
for entry in "${cases[@]}"; do
  IFS='|' read -r name shape tool log <<<"$entry"
  code=$(sed -n 's/^exit \([0-9]*\) seconds.*/\1/p' "$log" | tail -1)
  seconds=$(sed -n 's/^exit [0-9]* seconds \([0-9]*\)/\1/p' "$log" | tail -1)
  # "========= ERROR SUMMARY: 0 errors" (memcheck, synccheck, initcheck), or racecheck's
  # "========= RACECHECK SUMMARY: 20 hazards displayed (24650 errors, 0 warnings)".
  errors=$(sed -n 's/.*ERROR SUMMARY: \([0-9]*\) error.*/\1/p' "$log" | tail -1)
  [ -n "$errors" ] || errors=$(sed -n 's/.*RACECHECK SUMMARY: .*(\([0-9]*\) error.*/\1/p' "$log" | tail -1)
  verdict=$(sed -n 's/^RESULT .*status=\([^ ]*\).*/\1/p' "$log" | tail -1)
  if [ "$code" = 124 ] || [ "$code" = 137 ]; then
    errors="timed out after ${limit}s"
  elif [ -z "$errors" ]; then
    errors="no ERROR SUMMARY (exit $code)"
  fi
  [ -n "$verdict" ] || verdict="none (exit $code)"
  # racecheck's warnings (hazards below error level) do not fail the row but are shown.
  warnings=$(sed -n 's/.*RACECHECK SUMMARY: .* \([0-9]*\) warning.*/\1/p' "$log" | tail -1)
  shown=$errors
  [ -n "$warnings" ] && [ "$warnings" != 0 ] && shown="$errors (+ $warnings warnings)"
  # Where: racecheck's race pairs ("Write at zaya1_attention+0x88d0 / Write at
  # zaya1_attention+0x59f0 [20 hazards]"), else each distinct "kind at kernel+offset" of the
  # other tools' reports ("Invalid __global__ read at zaya1_out_proj+0x1a0 x3"); 4 at most.
  sites=$(awk '
    /Race reported between/ {
      match($0, /(Read|Write) access at [^ ]+/); first = substr($0, RSTART, RLENGTH); next
    }
    first != "" && /^=+ +and / {
      match($0, /(Read|Write) access at [^ ]+/); second = substr($0, RSTART, RLENGTH)
      match($0, /\[[0-9]+ hazards?\]/); count = substr($0, RSTART, RLENGTH)
      print first " / " second " " count; next
    }
    /Invalid __[a-z]+__ (read|write)|Uninitialized __global__ memory read|Barrier error|Misaligned|Illegal/ {
      kind = $0; sub(/^=+ +/, "", kind); sub(/ of size.*| detected.*/, "", kind); next
    }
    kind != "" && match($0, /[A-Za-z_][A-Za-z0-9_]*\+0x[0-9a-f]+/) {
      print kind " at " substr($0, RSTART, RLENGTH); kind = ""
    }' "$log" | sed 's/ access at / at /g' | sort | uniq -c | sort -rn | head -4 |
    awk '{ count = $1; $1 = ""; printf "%s%s%s", (NR > 1 ? "; " : ""), substr($0, 2), (count > 1 ? " x" count : "") }')
  if [ "$errors" != 0 ] || [ "$verdict" != pass ]; then failures=$((failures + 1)); fi
  rows+=("| $name | $shape | $tool | $shown | ${sites:--} | $verdict | $seconds |")
done

table=$(printf '%s\n' "$header" "${rows[@]}")
echo "$table"
echo "gpu-sanitize: $failures failing row(s)"
{
  echo "# compute-sanitizer, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  nvidia-smi -L 2>/dev/null | sed 's/^/    /'
  echo "    $("$sanitizer" --version | tail -1)"
  echo
  echo "$table"
  echo
  echo "$failures failing row(s). A row fails when its tool reports any error, when validate does"
  echo "not pass under it, or when it times out (${limit}s each). Full output: sanitize.log."
} >"$out/sanitize.md"
for entry in "${cases[@]}"; do
  IFS='|' read -r name shape tool log <<<"$entry"
  printf '### %s %s %s\n' "$name" "$shape" "$tool"
  cat "$log"
  echo
done >"$out/sanitize.log"
rm -rf "$logs"
[ $failures -eq 0 ]
