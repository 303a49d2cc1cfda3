"""Access policy: who may do what on which server, decided before anything is forwarded."""
