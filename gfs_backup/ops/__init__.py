"""Operations: what reaches people and monitoring after (or instead of) a run: metrics,
freshness checks, notifications, dead-man pings, job hooks and journald fields."""
