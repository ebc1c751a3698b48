"""The classic producer -> many-consumer example: one producer makes 20 sausages,
16 consumers eat them, each taking a short random time.

    pcq run examples/sausages.py:produce examples/sausages.py:handle --workers 16 --maxsize 16
"""

import os
import random
import time


def produce():
    for n in range(20):
        yield {"sausage": n, "flavour": random.choice(["pork", "beef", "veggie"])}


def handle(item):
    time.sleep(random.uniform(0.05, 0.3))
    print(f"consumer {os.getpid()} ate sausage {item['sausage']} ({item['flavour']})", flush=True)
