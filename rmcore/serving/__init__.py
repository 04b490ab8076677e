"""rmcore over HTTP (the standard library's server; json_http.py says why):

    json_http.py      the shared server: JSON in and out, 4xx answers that name the field
    reward_server.py  eval.py serve: a reward model's /score and /health
    reward_client.py  HTTPReward: a served reward as a reward function (timeout, retries)
    label_server.py   eval.py label: the labeling page (label_page.html, plain HTML/JS) and its API
"""
