"""pmreplica-agent: the rpmemd of pmreplica.

Started on the target node over SSH (or as a local subprocess), it speaks the control
protocol on stdin/stdout, serves pools described by pool set files under its pool-set
directory, and receives their data on per-lane connections bound to the session.
"""
