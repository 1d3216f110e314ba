//! The conversation policy core (sans-IO). (in progress)
