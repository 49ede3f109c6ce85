"""kframe through the official `openai` Python client (pip install openai).

    KFRAME_API_KEY=kf-... python3 examples/http/openai_client.py [http://127.0.0.1:8080]

The api key is a tenant's, from `POST /admin/tenants` (see curl.sh).
"""
import json
import os
import sys

from openai import OpenAI

base = (sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080") + "/v1"
client = OpenAI(base_url=base, api_key=os.environ["KFRAME_API_KEY"])
model = client.models.list().data[0].id
print("model:", model)

done = client.completions.create(model=model, prompt="user secret of rosa 8493 . query secret of rosa", max_tokens=5, temperature=0)
print("completion:", json.dumps(done.choices[0].text, ensure_ascii=False))
print("usage:", done.usage)

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "remember code 4821"}], max_tokens=8, temperature=0
)
print("chat:", repr(chat.choices[0].message.content))

print("stream:", end=" ")
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "remember code 4821"}], max_tokens=8, stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
