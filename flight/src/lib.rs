//! Arrow Flight SQL over Ember's query engine. The tenant comes from the
//! `x-scope-orgid` metadata of every call (`anonymous` when absent); a
//! ticket carries only the statement, so a tenant is never taken from one.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTables, CommandPreparedStatementQuery, CommandStatementQuery,
    ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use datafusion::arrow::datatypes::Schema;
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::arrow::record_batch::RecordBatch;
use ember_engine::{AuthError, Authenticator, TenantId};
use ember_sql::{QueryEngine, Settings, TABLES};
use futures::{Stream, TryStreamExt};
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

pub use arrow_flight::flight_service_server::FlightServiceServer;

const TENANT_HEADER: &str = "x-scope-orgid";

pub struct EmberFlightSql {
    engine: Arc<QueryEngine>,
    auth: Arc<Authenticator>,
}

impl EmberFlightSql {
    pub fn new(engine: Arc<QueryEngine>, auth: Arc<Authenticator>) -> Self {
        Self { engine, auth }
    }

    /// The call's tenant: from its bearer token when authentication is on,
    /// else from `x-scope-orgid`.
    fn tenant<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let header = |name: &str| -> Result<Option<&str>, Status> {
            match req.metadata().get(name) {
                None => Ok(None),
                Some(v) => v
                    .to_str()
                    .map(Some)
                    .map_err(|_| Status::invalid_argument(format!("{name} is not ASCII"))),
            }
        };
        self.auth
            .tenant(header("authorization")?, header(TENANT_HEADER)?)
            .map(TenantId::into_string)
            .map_err(auth_status)
    }

    pub fn into_server(self) -> FlightServiceServer<Self> {
        FlightServiceServer::new(self)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

fn auth_status(e: AuthError) -> Status {
    match e {
        AuthError::Unauthenticated(m) => Status::unauthenticated(m),
        AuthError::Forbidden(m) => Status::permission_denied(m),
        AuthError::InvalidTenant(e) => Status::invalid_argument(format!("{e} in x-scope-orgid")),
    }
}

fn status(e: ember_sql::SqlError) -> Status {
    use datafusion::error::DataFusionError as E;
    let root = match &e {
        ember_sql::SqlError::DataFusion(df) => df.find_root(),
        ember_sql::SqlError::Tenant(_) => return Status::invalid_argument(e.to_string()),
        ember_sql::SqlError::Timeout(_) => return Status::deadline_exceeded(e.to_string()),
    };
    match root {
        E::ResourcesExhausted(_) => {
            Status::resource_exhausted(format!("query exceeds the memory limit: {e}"))
        }
        E::SQL(..)
        | E::Plan(_)
        | E::SchemaError(..)
        | E::NotImplemented(_)
        | E::Configuration(_) => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn sql_info() -> &'static SqlInfoData {
    static INFO: OnceLock<SqlInfoData> = OnceLock::new();
    INFO.get_or_init(|| {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "Ember");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        b.build().expect("static SQL info builds")
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn flight_info(
    schema: &Schema,
    ticket: impl ProstMessageExt,
    descriptor: FlightDescriptor,
) -> Result<FlightInfo, Status> {
    let ticket = Ticket::new(ticket.as_any().encode_to_vec());
    Ok(FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(e.to_string()))?
        .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
        .with_descriptor(descriptor))
}

fn batch_stream(
    schema: Arc<Schema>,
    batch: Result<RecordBatch, FlightError>,
) -> BoxStream<arrow_flight::FlightData> {
    Box::pin(
        FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(futures::stream::once(async { batch }))
            .map_err(Status::from),
    )
}

impl EmberFlightSql {
    async fn statement_schema(
        &self,
        tenant: &str,
        settings: &Settings,
        sql: &str,
    ) -> Result<Schema, Status> {
        let df = self
            .engine
            .plan(tenant, sql, settings)
            .await
            .map_err(status)?;
        Ok(df.schema().as_arrow().clone())
    }

    async fn run(
        &self,
        tenant: &str,
        settings: &Settings,
        sql: &str,
    ) -> Result<Response<BoxStream<arrow_flight::FlightData>>, Status> {
        let started = std::time::Instant::now();
        let stream = self
            .engine
            .execute(tenant, sql, settings)
            .await
            .map_err(status)?;
        tracing::debug!(
            tenant,
            sql,
            planned_ms = started.elapsed().as_millis() as u64,
            "flight sql query"
        );
        let schema = stream.schema();
        let batches = stream.map_err(|e| FlightError::Tonic(Box::new(status(e.into()))));
        let out = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(Status::from);
        Ok(Response::new(Box::pin(out)))
    }
}

/// The query settings a call's metadata asks for.
fn settings<T>(req: &Request<T>) -> Result<Settings, Status> {
    Settings::from_headers(|name| req.metadata().get(name).and_then(|v| v.to_str().ok()))
        .map_err(Status::invalid_argument)
}

fn handle_sql(handle: &[u8]) -> Result<&str, Status> {
    std::str::from_utf8(handle)
        .map_err(|_| Status::invalid_argument("statement handle is not UTF-8"))
}

#[tonic::async_trait]
impl FlightSqlService for EmberFlightSql {
    type FlightService = EmberFlightSql;

    /// The basic-auth handshake (Grafana's Flight SQL data source uses it):
    /// with authentication on, checks the user and answers with a bearer
    /// token for the user's tenant; with it off, any user gets a token and
    /// tenants come from `x-scope-orgid`, as behind Pyroscope's auth proxy.
    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let token = self.auth.handshake(authorization).map_err(auth_status)?;
        let out = futures::stream::iter(vec![Ok(HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into(),
        })]);
        let mut resp: Response<
            Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>,
        > = Response::new(Box::pin(out));
        let header = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|e| Status::internal(e.to_string()))?;
        resp.metadata_mut().insert("authorization", header);
        Ok(resp)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let tenant = self.tenant(&request)?;
        let schema = self
            .statement_schema(&tenant, &settings(&request)?, &query.query)
            .await?;
        let ticket = TicketStatementQuery {
            statement_handle: query.query.into_bytes().into(),
        };
        Ok(Response::new(flight_info(
            &schema,
            ticket,
            request.into_inner(),
        )?))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let tenant = self.tenant(&request)?;
        self.run(
            &tenant,
            &settings(&request)?,
            handle_sql(&ticket.statement_handle)?,
        )
        .await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let tenant = self.tenant(&request)?;
        let schema = self
            .statement_schema(&tenant, &settings(&request)?, &query.query)
            .await?;
        let IpcMessage(dataset_schema) = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e: datafusion::arrow::error::ArrowError| Status::internal(e.to_string()))?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema,
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        // Handles are the statements themselves: nothing to free.
        Ok(())
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let tenant = self.tenant(&request)?;
        let schema = self
            .statement_schema(
                &tenant,
                &settings(&request)?,
                handle_sql(&cmd.prepared_statement_handle)?,
            )
            .await?;
        Ok(Response::new(flight_info(
            &schema,
            cmd,
            request.into_inner(),
        )?))
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let tenant = self.tenant(&request)?;
        self.run(
            &tenant,
            &settings(&request)?,
            handle_sql(&query.prepared_statement_handle)?,
        )
        .await
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(sql_info()).schema();
        Ok(Response::new(flight_info(
            &schema,
            query,
            request.into_inner(),
        )?))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let builder = query.into_builder(sql_info());
        let schema = builder.schema();
        Ok(Response::new(batch_stream(schema, builder.build())))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        Ok(Response::new(flight_info(
            &schema,
            query,
            request.into_inner(),
        )?))
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let mut builder = query.into_builder();
        builder.append(ember_sql::CATALOG);
        let schema = builder.schema();
        Ok(Response::new(batch_stream(schema, builder.build())))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(flight_info(
            &schema,
            query,
            request.into_inner(),
        )?))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let tenant = self.tenant(&request)?;
        let mut builder = query.into_builder();
        builder.append(ember_sql::CATALOG, &tenant);
        let schema = builder.schema();
        Ok(Response::new(batch_stream(schema, builder.build())))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(flight_info(
            &schema,
            query,
            request.into_inner(),
        )?))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let tenant = self.tenant(&request)?;
        let mut builder = query.into_builder();
        for section in TABLES {
            builder
                .append(
                    ember_sql::CATALOG,
                    &tenant,
                    section.name(),
                    "TABLE",
                    section.schema().as_ref(),
                )
                .map_err(Status::from)?;
        }
        let schema = builder.schema();
        Ok(Response::new(batch_stream(schema, builder.build())))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
