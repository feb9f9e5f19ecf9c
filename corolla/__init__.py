"""The `corolla` command: the front door that starts either role and the tools around them. The
only package that imports both the gateway and the blockserver."""
