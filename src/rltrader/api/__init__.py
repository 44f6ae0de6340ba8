"""HTTP control API: triggers for the Prefect deployments (``triggers.router``), bearer-token auth (``auth``), and
the app that serves them (``app``). A later trader API mounts the same router behind the same auth."""
