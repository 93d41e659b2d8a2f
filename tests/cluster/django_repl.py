"""A Django process of the cluster that runs the code it is sent, for the cluster's fault tests.

Reads one JSON string (Python code) per line from stdin, runs it with Django set up from the cluster's
own environment (``var/cluster/console.env``: its PostgreSQL, its Redis through Sentinel), and writes
one JSON line back: ``{"result": <what the code assigned to result>}`` or ``{"error": <traceback>}``.
One process answers every query of a test module in milliseconds (``manage.py shell`` took seconds).
"""

import json
import sys
import traceback

import django

django.setup()

for line in sys.stdin:
    scope: dict = {"result": None}
    try:
        exec(json.loads(line), scope)  # noqa: S102 - the test's own code, in the test's own process tree
        answer = {"result": scope["result"]}
    except Exception:  # reported to the test, which fails with it
        answer = {"error": traceback.format_exc()}
    finally:
        from django.db import connection

        connection.close()  # each query sees what the workers committed since, and no transaction lingers
    sys.stdout.write(json.dumps(answer, default=str) + "\n")
    sys.stdout.flush()
