#!/usr/bin/env bash
# Fuzzes every target (or the ones named) for SECONDS each, one after another,
# on one core. Exits non-zero if any target crashed; the crashing input is in
# fuzz/artifacts/<target>/.
#
#   fuzz/run.sh SECONDS [TARGET...]
#
# Uses nightly with AddressSanitizer when `cargo +nightly` exists, otherwise
# stable with `--sanitizer none`. New corpus entries go to
# target/fuzz-corpus/<target> (not committed); the committed corpus/<target>
# and regressions/<target> are read as seeds. Logs: target/fuzz-logs/<target>.log.
# FUZZ_ARGS adds libFuzzer flags, e.g. FUZZ_ARGS="-fork=1 -ignore_crashes=1"
# to keep fuzzing past a known crash.
set -uo pipefail
cd "$(dirname "$0")"

seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
all=(envelope_open record_decode authid_parse token_response config_parse duplicati_request forwarded_for)
targets=("${@:-${all[@]}}")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== cargo install cargo-fuzz" >&2
    cargo install cargo-fuzz --locked || exit 1
fi
if cargo +nightly --version >/dev/null 2>&1; then
    toolchain=(+nightly)
    sanitizer=()
else
    echo "no nightly toolchain: fuzzing on stable without a sanitizer" >&2
    toolchain=()
    sanitizer=(--sanitizer none)
fi

mkdir -p target/fuzz-logs
failed=()
for t in "${targets[@]}"; do
    work=target/fuzz-corpus/$t
    mkdir -p "$work"
    seeds=("corpus/$t")
    [ -d "regressions/$t" ] && seeds+=("regressions/$t")
    dict=()
    [ -f "dict/$t.dict" ] && dict=("-dict=dict/$t.dict")
    echo "== $t: ${seconds}s"
    cargo "${toolchain[@]}" fuzz run "${sanitizer[@]}" "$t" "$work" "${seeds[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -max_len=8192 -print_final_stats=1 \
        "${dict[@]}" ${FUZZ_ARGS:-} 2>&1 | tee "target/fuzz-logs/$t.log" | grep -E '^(#[0-9]+.*(pulse|DONE)|Done|==[0-9]+==|stat::|.*panicked|SUMMARY|artifact_prefix|Test unit written)'
    status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        echo "!! $t failed (exit $status); see target/fuzz-logs/$t.log and artifacts/$t/" >&2
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "crashed: ${failed[*]}" >&2
    exit 1
fi
echo "no crash in: ${targets[*]}"
