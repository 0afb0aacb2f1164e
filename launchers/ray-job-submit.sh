#!/usr/bin/env bash
# Submit `dist-pgkm quantize` to a running Ray cluster as a Ray job (docs/launchers.md).
#
# The job's entrypoint runs on the cluster and decides there whether to resume: it adds
# --resume when OUT/manifest.json exists, so submitting the same command again after a failed,
# stopped or lost job continues the run instead of starting over.
set -euo pipefail

prog=${0##*/}

usage() {
    cat <<EOF
Usage: $prog [OPTIONS] MODEL CONFIG OUT [QUANTIZE_ARGS...]

Submit 'dist-pgkm quantize MODEL --config CONFIG --out OUT --address auto [QUANTIZE_ARGS...]'
to a running Ray cluster with 'ray job submit'. The job resumes the run in OUT when
OUT/manifest.json exists (checked on the cluster), so re-submitting continues a run.

MODEL, CONFIG and OUT are read and written by the cluster: give paths every node sees (a
shared file system) and absolute CONFIG and OUT paths. QUANTIZE_ARGS go to 'dist-pgkm
quantize' as they are, e.g. --workers 16, --gpus-per-worker 1, --json /shared/run.json.

Options:
  --dashboard URL       the cluster's dashboard / job server
                        (default: \$RAY_DASHBOARD, else http://127.0.0.1:8265)
  --submission-id ID    the Ray job's id (default: dist-pgkm-NAME-HASH-TIME, where NAME and
                        HASH come from OUT, so every submission for one OUT shares a prefix)
  --dist-pgkm CMD       the dist-pgkm executable on the cluster (default: dist-pgkm)
  --no-wait             return once the job is submitted instead of following its logs
  -h, --help            show this help

Exit status: that of 'ray job submit': with --no-wait 0 once submitted; otherwise 0 when the
job succeeded, non-zero when it failed or could not be submitted.
EOF
}

die() {
    printf '%s: error: %s\n' "$prog" "$1" >&2
    printf "Run '%s --help' for usage.\n" "$prog" >&2
    exit 2
}

dashboard=${RAY_DASHBOARD:-http://127.0.0.1:8265}
submission_id=
dist_pgkm=dist-pgkm
wait_flag=()

while (($# > 0)); do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --no-wait)
            wait_flag=(--no-wait)
            shift
            ;;
        --dashboard=* | --submission-id=* | --dist-pgkm=*)
            set -- "${1%%=*}" "${1#*=}" "${@:2}"
            ;;
        --dashboard | --submission-id | --dist-pgkm)
            (($# >= 2)) || die "$1 needs a value"
            case $1 in
                --dashboard) dashboard=$2 ;;
                --submission-id) submission_id=$2 ;;
                --dist-pgkm) dist_pgkm=$2 ;;
            esac
            shift 2
            ;;
        --)
            shift
            break
            ;;
        -*) die "unknown option $1 (launcher options go before MODEL)" ;;
        *) break ;;
    esac
done

(($# >= 3)) || die "expected MODEL CONFIG OUT, got $# argument(s)"
model=$1 config=$2 out=${3%/}
shift 3
for arg in "$@"; do
    case $arg in
        --address | --address=* | --out | --out=* | --config | --config=*)
            die "$arg: the launcher sets --address auto, --config and --out itself" ;;
    esac
done
[[ $config == /* ]] || die "CONFIG must be an absolute path as the cluster sees it: $config"
[[ $out == /* ]] || die "OUT must be an absolute path as the cluster sees it: $out"
[[ $dashboard == *://* ]] || die "--dashboard must be a URL such as http://HEAD:8265: $dashboard"

if [[ -z $submission_id ]]; then
    name=${out##*/}
    name=${name//[^A-Za-z0-9._-]/-}
    hash=$(printf '%s' "$out" | cksum)
    submission_id=$(printf 'dist-pgkm-%s-%08x-%s' "$name" "${hash%% *}" "$(date -u +%Y%m%dT%H%M%SZ)")
fi

# JSON string for the job's metadata (shown by `ray job list`): escape backslashes and quotes.
out_json=${out//\\/\\\\}
out_json=${out_json//\"/\\\"}

# The entrypoint is a word list: `ray job submit` joins it with shell quoting and the cluster
# runs it with /bin/sh, so paths with spaces survive. The script runs on the cluster, where
# OUT is (not on this machine), and picks fresh start or --resume there.
# shellcheck disable=SC2016  # $1, $@ and $out are expanded by that remote shell
resume_script='out=$1; shift
if [ -f "$out/manifest.json" ]; then
    echo "dist-pgkm job: resuming the run in $out" >&2
    set -- "$@" --resume
else
    echo "dist-pgkm job: starting a new run in $out" >&2
fi
exec "$@"'

echo "$prog: submitting $submission_id to $dashboard" >&2
exec ray job submit \
    --address "$dashboard" \
    --submission-id "$submission_id" \
    --metadata-json "{\"dist_pgkm_out\": \"$out_json\"}" \
    ${wait_flag[@]+"${wait_flag[@]}"} \
    -- sh -c "$resume_script" dist-pgkm-job "$out" \
    "$dist_pgkm" quantize "$model" --config "$config" --out "$out" --address auto "$@"
