"""Webhooks: a task's client is told when its task starts or ends, by a signed POST of
the task (Standard Webhooks), retried for a bounded time, to addresses the policy allows."""
