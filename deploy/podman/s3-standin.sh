#!/bin/sh
# moto's S3 server on :9000, the requests recorded before this start replayed first (see Containerfile.s3).
set -eu
mkdir -p "$(dirname "$MOTO_RECORDER_FILEPATH")"
moto_server -H 0.0.0.0 -p 9000 &
server=$!
trap 'kill -TERM $server; wait $server' TERM INT
ask() { python3 -c "import sys, urllib.request as u; u.urlopen(u.Request(sys.argv[1], method=sys.argv[2]))" "$@"; }
until ask http://127.0.0.1:9000/moto-api/ GET 2>/dev/null; do sleep 0.2; done
if [ -s "$MOTO_RECORDER_FILEPATH" ]; then
  ask http://127.0.0.1:9000/moto-api/recorder/replay-recording POST
  echo "replayed $(wc -l < "$MOTO_RECORDER_FILEPATH") recorded requests"
fi
wait $server
