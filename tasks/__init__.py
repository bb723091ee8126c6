"""The worker role: Herald's Celery task and the processing it runs.

- `worker`: the Celery app (`celery -A tasks:celery_app worker`) and the task, a
  shell of retries and acks;
- `redelivery`: what becomes of a batch a worker died running, that failed for
  a reason that is not transient, or that waits for its turn (the policy);
- `processor`: the work itself (rules, the archive, the order gate, statuses),
  kept apart from Celery;
- `handback`: tasks of a worker that stopped answering, handed back;
- `taken`: the bridge's tasks this worker took, recorded for the bridge to
  notice the ones the broker lost;
- `flower`, `__main__`: the Flower and worker processes.

Importing this package builds nothing: the Celery app is made when
`celery_app` is first read, in the worker process.
"""


def __getattr__(name: str):
    if name == "celery_app":
        from tasks.worker import celery_app

        return celery_app
    raise AttributeError(name)
