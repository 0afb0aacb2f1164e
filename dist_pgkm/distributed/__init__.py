"""Running the plan: in-process or on Ray actors, with one coordinator writing the output."""
