"""How weights move: the parameters' flat storage (:mod:`.buffers`) and the MPI exchange (:mod:`.exchange`)."""
