"""The paramiko SSH launcher, split as paramiko itself is: the ssh config (:mod:`.includes`,
:mod:`.settings`, :mod:`.account`), host keys (:mod:`.known_hosts`, :mod:`.cert`,
:mod:`.host_key`), connecting (:mod:`.connect`) and logging in (:mod:`.auth`), the kept
connections (:mod:`.connections`), an agent's exec channel (:mod:`.exec_channel`) and the
launcher itself (:mod:`.launcher`). Importing the package loads no paramiko.
"""
