"""What the benchmarks share: starting and stopping the processes they run (``processes``),
CPU time per component from /proc (``cpu``), py-spy and statement timing (``profiling``), the
service's bootstrap environment (``environment``) and the sections of BENCHMARKS.md
(``report``)."""
