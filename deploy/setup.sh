#!/bin/sh
# One-shot setup of the compose deployment (the `setup` service of docker-compose.yml):
# create the job from JOB_FILE, issue one worker token per NAME into $PUM_TOKENS_DIR/NAME.token
# (mode 600), write the job id to $PUM_TOKENS_DIR/job-id, and start the job.
#
# A rerun (docker compose up again) reuses the job named in job-id while it is still created,
# running or paused, and its tokens; once that job has ended, a new job is created.
#
# Usage: setup.sh JOB_FILE NAME...
# Environment:
#   PUM_ADMIN_TOKEN  the server's admin token (required)
#   PUM_SERVER_URL   the server (default http://server:8000)
#   PUM_TOKENS_DIR   where the tokens go (default /tokens, a volume shared with the workers)
#   PUM_CA_FILE      CA bundle that verifies the server's certificate, when it serves HTTPS
# Tokens are secrets: they are written to files and never printed.
set -eu

if [ "$#" -lt 2 ]; then
    echo "usage: setup.sh JOB_FILE NAME... (one NAME per worker)" >&2
    exit 2
fi
job_file=$1
shift
tokens_dir=${PUM_TOKENS_DIR:-/tokens}
: "${PUM_ADMIN_TOKEN:?set PUM_ADMIN_TOKEN to the server admin token}"
PUM_SERVER_URL=${PUM_SERVER_URL:-http://server:8000}
export PUM_ADMIN_TOKEN PUM_SERVER_URL

for name in "$@"; do
    case $name in
        "" | job-id | *[!A-Za-z0-9_.-]*)
            echo "setup: worker name '$name' must be letters, digits, '.', '_' or '-' (and not job-id)" >&2
            exit 2
            ;;
    esac
done

# json_field KEY: print the top-level field KEY of the JSON object on stdin; when there is none (the
# pum command before it failed and said why on stderr), fail with one line rather than a traceback.
json_field() {
    python -c '
import json, sys
try:
    print(json.load(sys.stdin)[sys.argv[1]])
except (ValueError, KeyError, TypeError):
    sys.exit("setup: no " + sys.argv[1] + " in the answer (see the error above)")
' "$1"
}

mkdir -p "$tokens_dir"
job_id=""
state=""
if [ -s "$tokens_dir/job-id" ]; then
    previous=$(cat "$tokens_dir/job-id")
    state=$(pum admin ${PUM_CA_FILE:+--ca-file "$PUM_CA_FILE"} status "$previous" --json | json_field state 2>/dev/null) || state=""
    case $state in
        created | running | paused)
            job_id=$previous
            echo "setup: reusing job $job_id ($state)"
            ;;
        *)
            echo "setup: previous job $previous is ${state:-unknown}; creating a new one"
            ;;
    esac
fi

reused=yes
if [ -z "$job_id" ]; then
    reused=no
    job_id=$(pum admin ${PUM_CA_FILE:+--ca-file "$PUM_CA_FILE"} create "$job_file" | json_field id)
    state=created
    echo "setup: created job $job_id from $job_file"
fi

umask 077
for name in "$@"; do
    file="$tokens_dir/$name.token"
    if [ "$reused" = yes ] && [ -s "$file" ]; then
        continue
    fi
    pum admin ${PUM_CA_FILE:+--ca-file "$PUM_CA_FILE"} token "$job_id" --label "$name" | json_field token > "$file.tmp"
    mv "$file.tmp" "$file"
    echo "setup: token for $name written to $file"
done
printf '%s\n' "$job_id" > "$tokens_dir/job-id.tmp"
mv "$tokens_dir/job-id.tmp" "$tokens_dir/job-id"

if [ "$state" = created ]; then
    pum admin ${PUM_CA_FILE:+--ca-file "$PUM_CA_FILE"} start "$job_id" > /dev/null
    echo "setup: started job $job_id"
fi
echo "setup: done; follow it with: docker compose exec server pum admin status $job_id"
