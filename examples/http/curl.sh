#!/usr/bin/env bash
# Talks to a running `kframe serve` with curl: creates a tenant with the admin
# token, then completes, chats, streams and continues a session as that tenant.
#
#     ./scripts/run.sh &                      # serves on 127.0.0.1:8080
#     examples/http/curl.sh                   # KFRAME_URL / KFRAME_DATA_DIR to override
set -euo pipefail
url=${KFRAME_URL:-http://127.0.0.1:8080}
data=${KFRAME_DATA_DIR:-target/demo-data}
admin=$(cat "$data/admin.token")
name=${1:-demo-$RANDOM}

echo "== create tenant $name (the api key is shown only now)"
key=$(curl -sf "$url/admin/tenants" -H "Authorization: Bearer $admin" \
    -d "{\"name\": \"$name\"}" | sed -n 's/.*"api_key":"\([^"]*\)".*/\1/p')
echo "api key: ${key:0:12}..."

echo "== completion"
curl -s "$url/v1/completions" -H "Authorization: Bearer $key" -H "Content-Type: application/json" \
    -d '{"prompt": "user secret of rosa 8493 . query secret of rosa", "max_tokens": 1, "temperature": 0}'
echo

echo "== chat, streamed"
curl -sN "$url/v1/chat/completions" -H "Authorization: Bearer $key" -H "Content-Type: application/json" \
    -d '{"messages": [{"role": "user", "content": "remember code 4821"}, {"role": "assistant", "content": "ok , i will remember it ."},
         {"role": "user", "content": "what is my code ?"}], "max_tokens": 8, "temperature": 0, "stream": true}'

echo "== a session: the second request reuses the first one's cache"
session=$(curl -sf -X POST "$url/v1/sessions" -H "Authorization: Bearer $key" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
for prompt in "user secret of ivan 1234 ." "user secret of ivan 1234 . query secret of ivan"; do
    curl -s "$url/v1/completions" -H "Authorization: Bearer $key" -H "X-Kframe-Session: $session" \
        -d "{\"prompt\": \"$prompt\", \"max_tokens\": 1, \"temperature\": 0}"
    echo
done

echo "== metrics"
curl -s "$url/metrics" | grep -E '^kframe_(tenants|engine_tokens_generated_total) '
