//! Arrow Flight SQL over Ember's query engine. The tenant comes from the
//! `x-scope-orgid` metadata of every call (`anonymous` when absent); a
//! ticket carries only the statement, so a tenant is never taken from one.

mod cancel;
mod xdbc;

use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionCancelQueryRequest, ActionCancelQueryResult, ActionClosePreparedStatementRequest,
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any, Command,
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, CommandGetXdbcTypeInfo, CommandPreparedStatementQuery, CommandStatementQuery,
    DoPutPreparedStatementResult, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, ActionType, CancelFlightInfoRequest, CancelFlightInfoResult, CancelStatus,
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage,
    SchemaAsIpc, Ticket,
};
use cancel::{until_cancelled, Cancellations};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::scalar::ScalarValue;
use ember_engine::{AuthError, Authenticator, TenantId};
use ember_sql::system::{SystemTable, SCHEMA as SYSTEM_SCHEMA};
use ember_sql::{ErrorKind, QueryEngine, Settings, TABLES};
use futures::{Stream, TryStreamExt};
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status, Streaming};

pub use arrow_flight::flight_service_server::FlightServiceServer;

const TENANT_HEADER: &str = "x-scope-orgid";
/// The profile tables' type, as DataFusion's information_schema names it
/// (and Grafana's Flight SQL data source filters on).
const BASE_TABLE: &str = "BASE TABLE";
const SYSTEM_TABLE: &str = "SYSTEM TABLE";

pub struct EmberFlightSql {
    engine: Arc<QueryEngine>,
    auth: Arc<Authenticator>,
    cancellations: Arc<Cancellations>,
}

const CANCEL_FLIGHT_INFO: &str = "CancelFlightInfo";

impl EmberFlightSql {
    /// Cancels the queries of a FlightInfo's tickets.
    fn cancel(&self, tenant: &str, info: &FlightInfo) -> CancelStatus {
        let ids = query_ids(info);
        for id in &ids {
            self.cancellations.cancel(tenant, id);
        }
        if ids.is_empty() {
            CancelStatus::NotCancellable
        } else {
            CancelStatus::Cancelled
        }
    }

    pub fn new(engine: Arc<QueryEngine>, auth: Arc<Authenticator>) -> Self {
        Self {
            engine,
            auth,
            cancellations: Arc::default(),
        }
    }

    fn tenant<T>(&self, req: &Request<T>) -> Result<String, Status> {
        tenant_of(&self.auth, req)
    }

    /// The gRPC service, which checks credentials on every call before it
    /// reaches a method: with authentication on, a call without them (or
    /// with wrong ones) is UNAUTHENTICATED, metadata calls and ListActions
    /// included. The basic-auth handshake carries its credentials in the
    /// same header, so it passes as a statement would.
    pub fn into_server(self) -> InterceptedService<FlightServiceServer<Self>, Credentials> {
        let credentials = Credentials(self.auth.clone());
        let server = FlightServiceServer::new(self)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(64 << 20);
        InterceptedService::new(server, credentials)
    }
}

/// Refuses a call whose credentials name no tenant.
#[derive(Clone)]
pub struct Credentials(Arc<Authenticator>);

impl Interceptor for Credentials {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.0.enabled() {
            tenant_of(&self.0, &request)?;
        }
        Ok(request)
    }
}

/// The call's tenant: from its bearer token when authentication is on,
/// else from `x-scope-orgid`.
fn tenant_of<T>(auth: &Authenticator, req: &Request<T>) -> Result<String, Status> {
    let header = |name: &str| -> Result<Option<&str>, Status> {
        match req.metadata().get(name) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(Some)
                .map_err(|_| Status::invalid_argument(format!("{name} is not ASCII"))),
        }
    };
    auth.tenant(header("authorization")?, header(TENANT_HEADER)?)
        .map(TenantId::into_string)
        .map_err(auth_status)
}

fn auth_status(e: AuthError) -> Status {
    match e {
        AuthError::Unauthenticated(m) => Status::unauthenticated(m),
        AuthError::Forbidden(m) => Status::permission_denied(m),
        AuthError::InvalidTenant(e) => Status::invalid_argument(format!("{e} in x-scope-orgid")),
    }
}

fn status(e: ember_sql::SqlError) -> Status {
    match e.kind() {
        ErrorKind::InvalidArgument => Status::invalid_argument(e.to_string()),
        ErrorKind::ResourceExhausted => {
            Status::resource_exhausted(format!("query exceeds the memory limit: {e}"))
        }
        ErrorKind::DeadlineExceeded => Status::deadline_exceeded(e.to_string()),
        ErrorKind::Unavailable => Status::unavailable(e.to_string()),
        ErrorKind::Internal => Status::internal(e.to_string()),
    }
}

/// What GetSqlInfo answers. Grafana's Flight SQL data source asks for
/// everything and reads the values of rows 17 to 21 by position as the SQL
/// keywords and the numeric, string, system and date-time functions; rows
/// are sorted by id, so exactly 17 ids below `SqlKeywords` (508) come first.
fn sql_info() -> &'static SqlInfoData {
    static INFO: OnceLock<SqlInfoData> = OnceLock::new();
    INFO.get_or_init(|| {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "Ember");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        // SqlSupportedTransaction::None.
        b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        b.append(SqlInfo::FlightSqlServerCancel, true);
        b.append(SqlInfo::FlightSqlServerStatementTimeout, 0i32);
        b.append(SqlInfo::FlightSqlServerTransactionTimeout, 0i32);
        b.append(SqlInfo::SqlDdlCatalog, false);
        b.append(SqlInfo::SqlDdlSchema, false);
        b.append(SqlInfo::SqlDdlTable, false);
        // SqlSupportedCaseSensitivity::Lowercase, as DataFusion folds names.
        b.append(SqlInfo::SqlIdentifierCase, 2i32);
        b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        // SqlSupportedCaseSensitivity::CaseSensitive.
        b.append(SqlInfo::SqlQuotedIdentifierCase, 1i32);
        b.append(SqlInfo::SqlAllTablesAreSelectable, true);
        let f = FunctionLists::of_datafusion();
        b.append(SqlInfo::SqlKeywords, f.keywords);
        b.append(SqlInfo::SqlNumericFunctions, f.numeric);
        b.append(SqlInfo::SqlStringFunctions, f.string);
        b.append(SqlInfo::SqlSystemFunctions, f.system);
        b.append(SqlInfo::SqlDatetimeFunctions, f.datetime);
        b.build().expect("static SQL info builds")
    })
}

/// The SQL editor's autocompletion lists, from DataFusion's own function
/// registry (by each function's documentation section) and Ember's profile
/// functions.
struct FunctionLists {
    keywords: Vec<String>,
    numeric: Vec<String>,
    string: Vec<String>,
    system: Vec<String>,
    datetime: Vec<String>,
}

impl FunctionLists {
    fn of_datafusion() -> Self {
        let state = datafusion::prelude::SessionContext::new().state();
        let mut lists = Self {
            keywords: datafusion::sql::sqlparser::keywords::ALL_KEYWORDS
                .iter()
                .map(|k| k.to_string())
                .collect(),
            numeric: Vec::new(),
            string: Vec::new(),
            system: ember_sql::profile_function_names()
                .map(str::to_string)
                .collect(),
            datetime: Vec::new(),
        };
        for (name, udf) in state.scalar_functions() {
            let section = udf.documentation().map(|d| d.doc_section.label);
            let list = match section {
                Some("Math Functions") => &mut lists.numeric,
                Some(
                    "String Functions" | "Binary String Functions" | "Regular Expression Functions",
                ) => &mut lists.string,
                Some("Time and Date Functions") => &mut lists.datetime,
                _ => &mut lists.system,
            };
            list.push(name.clone());
        }
        for list in [
            &mut lists.numeric,
            &mut lists.string,
            &mut lists.system,
            &mut lists.datetime,
        ] {
            list.sort();
            list.dedup();
        }
        lists
    }
}

/// `PreparedHandle` and `StatementHandle`, from
/// `flight/proto/ember/flight/v1/handles.proto`.
mod handles {
    include!(concat!(env!("OUT_DIR"), "/ember.flight.v1.rs"));
}
use handles::{PreparedHandle, StatementHandle};

impl StatementHandle {
    fn decode_from(handle: &[u8]) -> Result<Self, Status> {
        Self::decode(handle).map_err(|e| Status::invalid_argument(format!("statement handle: {e}")))
    }
}

/// A fresh id for a query's ticket.
fn query_id() -> String {
    ulid::Ulid::new().to_string()
}

/// The query ids a FlightInfo's tickets carry.
fn query_ids(info: &FlightInfo) -> Vec<String> {
    info.endpoint
        .iter()
        .filter_map(|e| e.ticket.as_ref())
        .filter_map(|t| Any::decode(&*t.ticket).ok())
        .filter_map(|any| Command::try_from(any).ok())
        .filter_map(|command| match command {
            Command::TicketStatementQuery(t) => StatementHandle::decode(&*t.statement_handle)
                .ok()
                .map(|h| h.query_id),
            Command::CommandPreparedStatementQuery(c) => {
                PreparedHandle::decode(&*c.prepared_statement_handle)
                    .ok()
                    .map(|h| h.query_id)
            }
            _ => None,
        })
        .filter(|id| !id.is_empty())
        .collect()
}

impl PreparedHandle {
    fn decode_from(handle: &[u8]) -> Result<Self, Status> {
        Self::decode(handle)
            .map_err(|e| Status::invalid_argument(format!("prepared statement handle: {e}")))
    }

    /// The bound values, in placeholder order (`$1` first).
    fn params(&self) -> Result<Vec<ScalarValue>, Status> {
        if self.parameters.is_empty() {
            return Ok(Vec::new());
        }
        let bad =
            |e: String| Status::invalid_argument(format!("prepared statement parameters: {e}"));
        let mut reader = StreamReader::try_new(std::io::Cursor::new(&self.parameters), None)
            .map_err(|e| bad(e.to_string()))?;
        let batch = reader
            .next()
            .ok_or_else(|| bad("no parameter row".into()))?
            .map_err(|e| bad(e.to_string()))?;
        one_row(&batch).map_err(bad)
    }
}

/// The values of a parameter batch's single row.
fn one_row(batch: &RecordBatch) -> Result<Vec<ScalarValue>, String> {
    if batch.num_rows() != 1 {
        return Err(format!(
            "bind exactly one row of parameters, got {}",
            batch.num_rows()
        ));
    }
    batch
        .columns()
        .iter()
        .map(|c| ScalarValue::try_from_array(c, 0).map_err(|e| e.to_string()))
        .collect()
}

/// The parameters a statement's placeholders take, `$1` first, typed where
/// DataFusion can tell (else Utf8, which it casts from).
fn parameter_schema(types: &std::collections::HashMap<String, Option<DataType>>) -> Schema {
    let mut names: Vec<(usize, String)> = types
        .keys()
        .map(|k| {
            (
                k.trim_start_matches('$').parse().unwrap_or(usize::MAX),
                k.clone(),
            )
        })
        .collect();
    names.sort();
    Schema::new(
        names
            .into_iter()
            .map(|(_, name)| {
                let ty = types
                    .get(&name)
                    .cloned()
                    .flatten()
                    .unwrap_or(DataType::Utf8);
                Field::new(name, ty, true)
            })
            .collect::<Vec<_>>(),
    )
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
        let described = self
            .engine
            .describe(tenant, sql, settings, Vec::new())
            .await
            .map_err(status)?;
        Ok(described.columns.as_ref().clone())
    }

    async fn run(
        &self,
        tenant: &str,
        settings: &Settings,
        sql: &str,
        params: Vec<ScalarValue>,
        query_id: &str,
    ) -> Result<Response<BoxStream<arrow_flight::FlightData>>, Status> {
        let running = self.cancellations.start(tenant, query_id)?;
        let started = std::time::Instant::now();
        let stream = self
            .engine
            .execute_with_params(tenant, sql, settings, params)
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
        Ok(Response::new(Box::pin(until_cancelled(out, running))))
    }
}

/// The query settings a call's metadata asks for.
fn settings<T>(req: &Request<T>) -> Result<Settings, Status> {
    Settings::from_headers(|name| req.metadata().get(name).and_then(|v| v.to_str().ok()))
        .map_err(Status::invalid_argument)
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
        let handle = StatementHandle {
            sql: query.query,
            query_id: query_id(),
        };
        let ticket = TicketStatementQuery {
            statement_handle: handle.encode_to_vec().into(),
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
        let handle = StatementHandle::decode_from(&ticket.statement_handle)?;
        self.run(
            &tenant,
            &settings(&request)?,
            &handle.sql,
            Vec::new(),
            &handle.query_id,
        )
        .await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let tenant = self.tenant(&request)?;
        let described = self
            .engine
            .describe(&tenant, &query.query, &settings(&request)?, Vec::new())
            .await
            .map_err(status)?;
        let ipc = |schema: &Schema| -> Result<bytes::Bytes, Status> {
            let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
                .try_into()
                .map_err(|e: datafusion::arrow::error::ArrowError| {
                    Status::internal(e.to_string())
                })?;
            Ok(bytes)
        };
        let handle = PreparedHandle {
            sql: query.query,
            parameters: Vec::new(),
            query_id: String::new(),
        };
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.encode_to_vec().into(),
            dataset_schema: ipc(&described.columns)?,
            parameter_schema: ipc(&parameter_schema(&described.parameters))?,
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
        let mut handle = PreparedHandle::decode_from(&cmd.prepared_statement_handle)?;
        let described = self
            .engine
            .describe(&tenant, &handle.sql, &settings(&request)?, handle.params()?)
            .await
            .map_err(status)?;
        handle.query_id = query_id();
        let cmd = CommandPreparedStatementQuery {
            prepared_statement_handle: handle.encode_to_vec().into(),
        };
        Ok(Response::new(flight_info(
            &described.columns,
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
        let handle = PreparedHandle::decode_from(&query.prepared_statement_handle)?;
        let params = handle.params()?;
        self.run(
            &tenant,
            &settings(&request)?,
            &handle.sql,
            params,
            &handle.query_id,
        )
        .await
    }

    /// Binds parameters (one row) to a prepared statement: the answer is a
    /// new handle that carries them.
    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        self.tenant(&request)?;
        let mut handle = PreparedHandle::decode_from(&query.prepared_statement_handle)?;
        let stream = request.into_inner().map_err(FlightError::from);
        let batches: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(stream)
            .try_collect()
            .await
            .map_err(|e| Status::invalid_argument(format!("parameters: {e}")))?;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let Some(batch) = batches.into_iter().find(|b| b.num_rows() > 0) else {
            return Err(Status::invalid_argument(
                "bind exactly one row of parameters, got 0",
            ));
        };
        if rows != 1 {
            return Err(Status::invalid_argument(format!(
                "bind exactly one row of parameters, got {rows}"
            )));
        }
        one_row(&batch).map_err(Status::invalid_argument)?;
        let mut ipc = Vec::new();
        {
            let mut writer = StreamWriter::try_new(&mut ipc, &batch.schema())
                .map_err(|e| Status::internal(e.to_string()))?;
            writer
                .write(&batch)
                .and_then(|_| writer.finish())
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        handle.parameters = ipc;
        handle.query_id.clear();
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(handle.encode_to_vec().into()),
        })
    }

    async fn get_flight_info_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.tenant(&request)?;
        let schema = query.into_builder(xdbc::types()?).schema();
        Ok(Response::new(flight_info(
            &schema,
            query,
            request.into_inner(),
        )?))
    }

    async fn do_get_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.tenant(&request)?;
        let builder = query.into_builder(xdbc::types()?);
        let schema = builder.schema();
        Ok(Response::new(batch_stream(schema, builder.build())))
    }

    /// `CancelQuery`, the older form of `CancelFlightInfo`.
    async fn do_action_cancel_query(
        &self,
        query: ActionCancelQueryRequest,
        request: Request<Action>,
    ) -> Result<ActionCancelQueryResult, Status> {
        let tenant = self.tenant(&request)?;
        let info = FlightInfo::decode(query.info)
            .map_err(|e| Status::invalid_argument(format!("CancelQuery info: {e}")))?;
        // `ActionCancelQueryResult.CancelResult` (not exported by arrow-flight).
        const CANCELLED: i32 = 1;
        const NOT_CANCELLABLE: i32 = 3;
        let result = match self.cancel(&tenant, &info) {
            CancelStatus::Cancelled => CANCELLED,
            _ => NOT_CANCELLABLE,
        };
        Ok(ActionCancelQueryResult { result })
    }

    /// `CancelFlightInfo` (a Flight action, not a Flight SQL command).
    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> Result<Response<<Self as FlightService>::DoActionStream>, Status> {
        if request.get_ref().r#type != CANCEL_FLIGHT_INFO {
            return Err(Status::invalid_argument(format!(
                "unknown action {:?}",
                request.get_ref().r#type
            )));
        }
        let tenant = self.tenant(&request)?;
        let info = CancelFlightInfoRequest::decode(request.into_inner().body)
            .map_err(|e| Status::invalid_argument(format!("CancelFlightInfo request: {e}")))?
            .info
            .ok_or_else(|| Status::invalid_argument("CancelFlightInfo without a FlightInfo"))?;
        let result = CancelFlightInfoResult::new(self.cancel(&tenant, &info));
        let body = arrow_flight::Result {
            body: result.encode_to_vec().into(),
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(body)]))))
    }

    async fn list_custom_actions(&self) -> Option<Vec<Result<ActionType, Status>>> {
        Some(vec![Ok(ActionType {
            r#type: CANCEL_FLIGHT_INFO.into(),
            description:
                "Cancel the query of a FlightInfo: it stops, or is refused if not fetched yet"
                    .into(),
        })])
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
                    BASE_TABLE,
                    section.schema().as_ref(),
                )
                .map_err(Status::from)?;
        }
        for table in SystemTable::ALL {
            builder
                .append(
                    ember_sql::CATALOG,
                    SYSTEM_SCHEMA,
                    table.name(),
                    SYSTEM_TABLE,
                    table.schema().as_ref(),
                )
                .map_err(Status::from)?;
        }
        let schema = builder.schema();
        Ok(Response::new(batch_stream(schema, builder.build())))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        Ok(Response::new(flight_info(
            &schema,
            query,
            request.into_inner(),
        )?))
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let mut builder = query.into_builder();
        builder.append(BASE_TABLE);
        builder.append(SYSTEM_TABLE);
        let schema = builder.schema();
        Ok(Response::new(batch_stream(schema, builder.build())))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
