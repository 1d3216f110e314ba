//! Real-time scheduling for the audio threads (SCHED_FIFO, mlockall); refusal is reported,
//! never fatal.
