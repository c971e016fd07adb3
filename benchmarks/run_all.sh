#!/usr/bin/env bash
# Run every benchmarks/bench_*.py and collect their output in one file.
#
#   bash benchmarks/run_all.sh                 # each benchmark with its default sizes
#   QUICK=1 bash benchmarks/run_all.sh         # small sizes (a few minutes in total)
#   ONLY="ls scaling" bash benchmarks/run_all.sh
#   ARGS_apply="--size-mb 1024" bash benchmarks/run_all.sh   # per-benchmark arguments
#   PY=/path/to/venv/bin/python bash benchmarks/run_all.sh   # default: python on PATH
#
# The last section of all.md is the table of every issue-14 goal ratio measured in this
# run (the benchmarks' GOAL lines), met or missed.
#
# Output: benchmarks/results/<name>.txt per benchmark and benchmarks/results/all.md with
# the machine, date, command and every table. Exit status: the number of failed benchmarks.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-$(command -v python || command -v python3)}  # the Python that has surgeon installed
export TF_CPP_MIN_LOG_LEVEL=3
OUT=benchmarks/results
mkdir -p "$OUT"
WORK=${BENCH_WORKDIR:-$(mktemp -d /tmp/surgeon_bench.XXXXXX)}
mkdir -p "$WORK"

quick_args() {  # small sizes for a smoke run
    case "$1" in
        apply|diff) echo "--size-mb 128" ;;
        edit) echo "--size-mb 128 --rounds 3" ;;
        ls) echo "--size-mb 128 --workdir $WORK" ;;
        scaling) echo "--sizes 64,128,256 --workdir $WORK" ;;
        convert) echo "--size-mb 64" ;;
        resnet) echo "--reps 1" ;;
        resume) echo "--steps 100 --reps 2" ;;
        merge) echo "--size-mb 128" ;;
        orbax) echo "--size-mb 128" ;;
        *) echo "" ;;
    esac
}

{
    echo "# surgeon benchmarks"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- machine: $(uname -srm); $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $(free -g | awk '/Mem:/{print $2}') GB RAM"
    echo "- python: $($PY -c 'import sys; print(sys.version.split()[0])'); commit $(git rev-parse --short HEAD 2>/dev/null)"
    echo "- command: ${QUICK:+QUICK=1 }bash benchmarks/run_all.sh"
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/all.md"

failed=0
: > "$OUT/goals.txt"  # the GOAL lines of this run's benchmarks
for script in benchmarks/bench_*.py; do
    name=$(basename "$script" .py); name=${name#bench_}
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
    var="ARGS_$name"
    args=${!var:-}
    [ -z "$args" ] && [ -n "${QUICK:-}" ] && args=$(quick_args "$name")
    echo "== $name: $PY $script $args" >&2
    start=$(date +%s)
    # shellcheck disable=SC2086
    if "$PY" "$script" $args > "$OUT/$name.txt" 2> "$OUT/$name.err"; then status=ok; else status="FAILED ($?)"; failed=$((failed + 1)); fi
    secs=$(( $(date +%s) - start ))
    grep -h '^GOAL ' "$OUT/$name.txt" >> "$OUT/goals.txt"
    {
        echo
        echo "## $name — $status, ${secs}s"
        echo
        echo "    $PY $script $args"
        echo
        cat "$OUT/$name.txt"
        [ "$status" != ok ] && { echo; echo '```'; tail -20 "$OUT/$name.err"; echo '```'; }
    } >> "$OUT/all.md"
    echo "   $status in ${secs}s" >&2
done
{
    echo
    echo "## Goals of issue 14, as measured in this run"
    echo
    echo "Every ratio the benchmarks printed as a \`GOAL\` line (bench_edit: goals 1-2;"
    echo "bench_scaling: 2, 4; bench_convert: 3; bench_start: 5; bench_resnet: 4)."
    echo
    echo "| goal | what | measured | target | verdict |"
    echo "|---|---|---:|---|---|"
    sort -s -k2,2n "$OUT/goals.txt" | sed 's/^GOAL /| /; s/$/ |/'
} >> "$OUT/all.md"
[ -z "${BENCH_WORKDIR:-}" ] && rm -rf "$WORK"
cat "$OUT/all.md"
exit $failed
