#!/bin/sh
# Entrypoint of a compose worker (docker-compose.yml's worker-N services): read this worker's
# token from the volume the setup service filled, then run `pum worker` on the local data.
#
# Usage: worker-entry.sh [more `pum worker` flags, e.g. --max-copies 2]
# Environment:
#   PUM_WORKER_NAME  which token to read: $PUM_TOKENS_DIR/$PUM_WORKER_NAME.token (required)
#   PUM_TOKENS_DIR   default /tokens
#   PUM_SERVER_URL   default http://server:8000
#   PUM_CA_FILE      CA bundle that verifies the server's certificate, when it serves HTTPS
# The token reaches `pum worker` through PUM_WORKER_TOKEN, not the command line, so it never
# shows in `ps` or in `docker inspect`.
set -eu

name=${PUM_WORKER_NAME:?set PUM_WORKER_NAME (the token is read from PUM_TOKENS_DIR/NAME.token)}
token_file="${PUM_TOKENS_DIR:-/tokens}/$name.token"
if [ ! -s "$token_file" ]; then
    echo "worker-entry: no token at $token_file: did the setup service finish?" >&2
    exit 1
fi
PUM_WORKER_TOKEN=$(cat "$token_file")
export PUM_WORKER_TOKEN

exec pum worker --server "${PUM_SERVER_URL:-http://server:8000}" ${PUM_CA_FILE:+--ca-file "$PUM_CA_FILE"} \
    --forget /data/forget.json --retain /data/retain.json \
    --saves-dir "/saves/workers/$name" "$@"
