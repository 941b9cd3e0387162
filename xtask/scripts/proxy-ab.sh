#!/bin/bash
# Interleaved A/B of proxy builds against nginx on one connection, with the
# CPU time each proxy spends per request.
#
# usage: xtask/scripts/proxy-ab.sh ROUNDS AGENT_BINARY...
#   CPU=1 pins every process (nginx, each proxy, wrk) to core 1.
# Needs the configuration `cargo xtask bench --only proxy` writes under
# target/bench-proxy (backend.conf, nginx-proxy.conf, proxy.yaml). Per round:
# nginx as proxy, then each binary as `agent proxy`, each under
# `wrk -t1 -c1 -d2s` with `perf stat -e task-clock` on the proxy. Prints the
# medians over rounds: requests/s, p50, p99 (µs), CPU µs per request.
set -euo pipefail
ROUNDS=$1; shift
D=$(realpath target/bench-proxy)
PIN="taskset -c ${CPU:-0-$(($(nproc) - 1))}"
$PIN nginx -c "$D/backend.conf" -p "$D" & NG=$!
$PIN nginx -c "$D/nginx-proxy.conf" -p "$D" & NG2=$!
trap 'kill $NG $NG2 2>/dev/null || true' EXIT
sleep 0.5
us() { case $1 in *us) echo "${1%us}";; *ms) awk "BEGIN{print ${1%ms}*1000}";; *s) awk "BEGIN{print ${1%s}*1000000}";; esac; }
declare -A RPS P50 P99 CPUS
one() { # name pids url
  perf stat -e task-clock -p "$2" -o /tmp/proxy-ab.pstat -- sleep 2.4 & local ps=$!
  sleep 0.1
  local r
  r=$($PIN wrk -t1 -c1 -d2s --latency "$3" | awk '/requests in/{n=$1} / 50%/{a=$2} / 99%/{b=$2} END{print n, a, b}')
  wait $ps
  set -- "$1" $r
  local tc
  tc=$(awk '/task-clock/{gsub(",","",$1); print $1}' /tmp/proxy-ab.pstat)
  RPS[$1]+="$(($2 / 2)) "; P50[$1]+="$(us "$3") "; P99[$1]+="$(us "$4") "
  CPUS[$1]+="$(awk -v t="$tc" -v n="$2" 'BEGIN{printf "%.2f", t*1000/n}') "
}
names="nginx"; i=0; for b in "$@"; do names="$names bin$i"; i=$((i + 1)); done
for _ in $(seq "$ROUNDS"); do
  one nginx "$(pgrep -P $NG2 | paste -sd,)" http://127.0.0.1:18282/index.html
  i=0
  for b in "$@"; do
    $PIN "$b" proxy --config "$D/proxy.yaml" 2>/dev/null & px=$!
    sleep 0.6
    one bin$i $px http://127.0.0.1:18281/index.html
    kill $px; wait $px || true
    i=$((i + 1))
  done
done
med() { echo "$@" | tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
for n in $names; do
  printf "%-6s rps %7s p50 %5s p99 %5s cpu/req %6s   [cpu: %s]\n" "$n" \
    "$(med ${RPS[$n]})" "$(med ${P50[$n]})" "$(med ${P99[$n]})" "$(med ${CPUS[$n]})" "${CPUS[$n]}"
done
