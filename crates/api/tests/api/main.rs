//! Integration tests of the settings API: a real PostgreSQL database per
//! test (testkit), the server on 127.0.0.1:0, reqwest as the client.

mod accounts;
mod api_keys;
mod bola;
mod browser;
mod consumption;
mod endpoints;
mod helpers;
mod http;
mod limits;
mod members;
mod openapi;
mod orgs;
mod providers;
mod secrets;
mod throttle;
mod usage;
